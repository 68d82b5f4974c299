#!/usr/bin/env bash
# Device job: kernel parity record + the GPU test suite (kernels and the vLLM backend). Results in $OUT.
# carry: .gpukit/b .gpukit/setup.sh .gpuwheels (pytest wheels: the host has no pytest)
set -u
source .gpukit/setup.sh >/dev/null 2>&1 || exit 3
source scripts/device_install.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .gpuwheels/*.whl >/dev/null 2>&1
export PYTHONPATH=$PYTHONPATH:/tmp/pyt PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/kernels/record_parity.py "$OUT/kernels_parity.json" 2>&1 | tail -5
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_vllm_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt" | grep -v "it/s\]" | tail -25
