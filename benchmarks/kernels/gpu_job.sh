#!/usr/bin/env bash
# Device job for issue 3, one call of <= KERNEL_BUDGET_S (default 450) s (NOT yet run in this form): kernel benchmarks (short variant sweep:
# baseline, the backend's tuned default and the opt-in candidates of kakeya_kernels.variants.CANDIDATES, with
# on-GPU agreement; the decode grid vs FA3 bf16 with the backend's tuned default, each row agreement-checked and
# guarded; seal variants vs prefill), then the kernel parity suite (tests/test_kernels.py, test_decode_variants.py:
# the tuned launch incl. maxnreg on the GPU, test_decode_candidates.py: the candidates' inline PTX on the GPU),
# results + KERNELS.md into $OUT. Needs the gpu-kit staged (FlashAttention-3 for the baseline; SDPA otherwise).
# Session 6 ran the full sweep (kernels_h200_session6.json) and crashed in the grid (fixed: see KERNELS.md).
# Triton compiles dominate (~3 s per kernel variant): the bench stops starting work after 230 s, parity gets
# what is left of 450 s (its last GPU run took 27 s of test time plus compiles).
set -u
T0=$(date +%s)
OUT=${OUT:?set OUT (the device sets it; a subfolder of it works)}
mkdir -p "$OUT"     # session 11 lost a call to a missing subfolder
# KERNEL_NO_KIT=1: no gpu-kit (nothing staged; the device's own torch + Triton): the baselines are torch SDPA, not FA3
# (kernels.json rows name theirs), the rest (candidates vs each other, parity, ncu) is unchanged.
if [ "${KERNEL_NO_KIT:-0}" = 1 ]; then echo "no gpu-kit: SDPA baselines"; else source .gpukit/setup.sh || exit 3; fi
source scripts/triton_cache.sh restore
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .gpuwheels/*.whl >/dev/null 2>&1
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/kakeya_kernels && ln -sfn "$PWD/kakeya_kv" /tmp/pp/kakeya_kv
ln -sfn "$PWD/vllm_backend/kakeya_v1_3_ppl" /tmp/pp/kakeya_v1_3_ppl   # planner/runtime in test_decode_variants
export PYTHONPATH=/tmp/pp:/tmp/pyt:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Profilers for the next step of issue 3 (stall reasons / occupancy), if the image has them.
for t in ncu nsys; do command -v $t >/dev/null && echo "profiler available: $(command -v $t)"; done
python3 -c "import torch; p = torch.cuda.get_device_properties(0); print('SMs', p.multi_processor_count, 'clock', getattr(p, 'clock_rate', '?'))" 2>/dev/null
BUDGET=${KERNEL_BUDGET_S:-450}      # the whole job; the bench gets half of it (at most 230 s of new work)
BENCH_S=$(( BUDGET / 2 < 230 ? BUDGET / 2 : 230 ))
[ "${KERNEL_PARITY:-1}" = 0 ] && BENCH_S=$(( BUDGET - 60 ))     # no parity after it: the bench gets the call
# KERNEL_GRID=full|goal|goal16k|none (bench --grid), KERNEL_GRID_VARIANT=tuned|best|ki8|ki8_sub2|ki8_sub4 (the grid's launch: TUNED, the
# sweep's winner per head_dim or the int8 K-score launch, the last two timed next to TUNED in each row),
# KERNEL_K_GRID=lloyd|uniform (every cache's K table; ki8 needs uniform), KERNEL_PARITY=0 skips the parity suite,
# KERNEL_PARITY_FILES="tests/test_ki8_decode.py tests/test_tailpages.py" (e.g.) runs only those parity files (resume a cut run), KERNEL_PARITY_MERGE=
# an earlier kernels_parity.json of the same card type whose other files' cases are kept (record_parity --merge).
# KERNEL_PREFILL=1: the prefill rows first (bench --prefill: each of variants.PREFILL_CANDIDATES vs the baseline launch
# and FA3 varlen, kernels.json "prefill"), for at most KERNEL_PREFILL_S (default 120) s; KERNEL_SWEEP=none skips the
# decode sweep (a prefill-only call: KERNEL_PREFILL=1 KERNEL_SWEEP=none KERNEL_GRID=none KERNEL_PARITY=0).
PREFILL_ARGS=""
[ "${KERNEL_PREFILL:-0}" = 1 ] && PREFILL_ARGS="--prefill --prefill-s ${KERNEL_PREFILL_S:-120}"
# KERNEL_INT8=1: the int8 MMA decode rows first (bench --int8, kernels.json "int8"), at most KERNEL_INT8_S (150) s.
[ "${KERNEL_INT8:-0}" = 1 ] && PREFILL_ARGS="--int8 --int8-s ${KERNEL_INT8_S:-150} $PREFILL_ARGS"
timeout $(( BENCH_S + 70 )) python3 benchmarks/kernels/bench_kernels.py --out "$OUT" --deadline-s $BENCH_S \
    --sweep "${KERNEL_SWEEP:-short}" --grid "${KERNEL_GRID:-full}" \
    --grid-variant "${KERNEL_GRID_VARIANT:-tuned}" --k-grid "${KERNEL_K_GRID:-lloyd}" $PREFILL_ARGS 2>&1 | grep -v Warning
python3 benchmarks/kernels/report.py "$OUT/kernels.json" "$OUT/KERNELS.md" && tail -3 "$OUT/KERNELS.md"
# KERNEL_NCU=1 (default) and ncu present: stall reasons / issue rate of one TUNED decode launch per head_dim (<= 120 s).
if [ "${KERNEL_NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  for d in 128 64; do
    timeout 60 ncu --kernel-name regex:_attn_kernel --launch-skip 3 --launch-count 1 --csv --page details \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
      --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 benchmarks/kernels/profile_decode.py --d $d > "$OUT/ncu_decode_d$d.csv" 2> "$OUT/ncu_decode_d$d.err"
    echo "ncu d=$d rc=$? $(wc -l < "$OUT/ncu_decode_d$d.csv") lines"
    grep -E '"(Issue Slots Busy|Issued Warp Per Scheduler|No Eligible|Achieved Occupancy|Registers Per Thread|Warp Cycles Per Issued Instruction)"|issue_stalled' "$OUT/ncu_decode_d$d.csv" | head -40 | awk -F'","' '{print $(NF-2), $NF}'
  done
fi
LEFT=$(( BUDGET - ($(date +%s) - T0) ))
echo "parity: ${LEFT}s left"
[ "${KERNEL_PARITY:-1}" = 1 ] && [ "$LEFT" -gt 30 ] && python3 benchmarks/kernels/record_parity.py "$OUT/kernels_parity.json" --timeout "$LEFT" \
  ${KERNEL_PARITY_FILES:+--files $KERNEL_PARITY_FILES} ${KERNEL_PARITY_MERGE:+--merge $KERNEL_PARITY_MERGE} 2>&1 | tail -25
source scripts/triton_cache.sh save
echo "total $(( $(date +%s) - T0 ))s"
