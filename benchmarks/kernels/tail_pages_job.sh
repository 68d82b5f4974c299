#!/usr/bin/env bash
# Device job (no gpu-kit needed; carry .gpuwheels): KAKEYA_TAIL_STORAGE=pages on the GPU at kernel level —
# tail_pages_bench.py (pool vs pages attention on the same data: identical outputs, time ratio; the masked block
# copy with every / no row flagged) and the pages tests of the data path (bit for bit vs the pool, graph decode path).
#   bash benchmarks/kernels/tail_pages_job.sh        -> $OUT/tail_pages.json, $OUT/pytest_pages.txt, a table last
set -u
OUT=${OUT:-/tmp/tail_pages_out}
mkdir -p "$OUT"
source scripts/device_install.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .gpuwheels/*.whl >/dev/null 2>&1
export PYTHONPATH=$PYTHONPATH:/tmp/pyt PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_tailpages.py \
  tests/test_vllm_runtime.py -k "pages or copy or geometry or group or view" > "$OUT/pytest_pages.txt" 2>&1
tail -3 "$OUT/pytest_pages.txt"
timeout "${BENCH_S:-200}" python3 benchmarks/kernels/tail_pages_bench.py --out "$OUT/tail_pages.json" ${BENCH_ARGS:-}
