#!/usr/bin/env bash
# Device job for issue 3 (one call of <= 8 min): kernel parity suite, then the kernel benchmarks
# (variant sweep, decode grid vs FA3 bf16, seal vs prefill), results + KERNELS.md into $OUT.
# Needs the gpu-kit staged (vLLM's FlashAttention-3 for the bf16 baseline; SDPA otherwise).
# Budget: parity <= 180 s (Triton compiles dominate), benchmarks stop starting work after 240 s.
set -u
source .gpukit/setup.sh || exit 3
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .gpuwheels/*.whl >/dev/null 2>&1
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/kakeya_kernels && ln -sfn "$PWD/kakeya_kv" /tmp/pp/kakeya_kv
export PYTHONPATH=/tmp/pp:/tmp/pyt:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 180 python3 benchmarks/kernels/record_parity.py "$OUT/kernels_parity.json" 2>&1 | tail -25
timeout 330 python3 benchmarks/kernels/bench_kernels.py --out "$OUT" --deadline-s 240 2>&1 | grep -v Warning
python3 benchmarks/kernels/report.py "$OUT/kernels.json" "$OUT/KERNELS.md" && tail -4 "$OUT/KERNELS.md"
