#!/usr/bin/env bash
# Device job for issue 3: kernel parity suite + kernel benchmarks, results into $OUT.
# Needs the gpu-kit staged (vLLM's FlashAttention-3 for the bf16 baseline).
set -u
source .gpukit/setup.sh || exit 3
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .gpuwheels/*.whl >/dev/null 2>&1
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/kakeya_kernels && ln -sfn "$PWD/kakeya_kv" /tmp/pp/kakeya_kv
export PYTHONPATH=/tmp/pp:/tmp/pyt:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/kernels/record_parity.py "$OUT/kernels_parity.json" 2>&1 | tail -25
python3 benchmarks/kernels/bench_kernels.py --out "$OUT" 2>&1 | grep -v Warning
