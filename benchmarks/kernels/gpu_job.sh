#!/usr/bin/env bash
# Device job for issue 3, one call of <= 8 min: kernel benchmarks (variant sweep with on-GPU agreement check,
# decode grid vs FA3 bf16 with the best variant, seal variants vs prefill), then the kernel parity suite,
# results + KERNELS.md into $OUT. Needs the gpu-kit staged (FlashAttention-3 for the baseline; SDPA otherwise).
# Triton compiles dominate (~3 s per kernel variant): the bench stops starting work after 200 s, parity gets
# what is left of 450 s.
set -u
T0=$(date +%s)
source .gpukit/setup.sh || exit 3
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .gpuwheels/*.whl >/dev/null 2>&1
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/kakeya_kernels && ln -sfn "$PWD/kakeya_kv" /tmp/pp/kakeya_kv
export PYTHONPATH=/tmp/pp:/tmp/pyt:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 290 python3 benchmarks/kernels/bench_kernels.py --out "$OUT" --deadline-s 200 2>&1 | grep -v Warning
python3 benchmarks/kernels/report.py "$OUT/kernels.json" "$OUT/KERNELS.md" && tail -3 "$OUT/KERNELS.md"
LEFT=$(( 450 - ($(date +%s) - T0) ))
echo "parity: ${LEFT}s left"
[ "$LEFT" -gt 30 ] && python3 benchmarks/kernels/record_parity.py "$OUT/kernels_parity.json" --timeout "$LEFT" 2>&1 | tail -25
echo "total $(( $(date +%s) - T0 ))s"
