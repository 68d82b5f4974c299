#!/usr/bin/env bash
# Device job: the vLLM GPU test suite (issues 4 and 7), most essential part first, within one device call.
#   bash benchmarks/vllm/suite_job.sh [PART ...]   PART: core lifecycle flash soak tp perlayer graphs scratch v13 (default: core lifecycle)
#   core       tests/test_vllm_gpu.py: alias + 512-token pages, 200 random aborts -> KV usage 0, prefix hits,
#              `vllm serve --attention-backend KAKEYA` answers an OpenAI chat request
#   lifecycle  tests/test_vllm_lifecycle.py: exact vs FLASH_ATTN, aborts at every phase, preemption, prefix hits,
#              chunk boundaries 511/512/513, mixed lengths (in-process engines, exact and k4v3); then, not yet run,
#              KAKEYA_EXACT_ATTENTION=flash: exact through FA == FLASH_ATTN token for token (8 x 256), k4v3 with FA
#              boundary layers 0,1,28,29 runs (session 6: 232 s without these; estimate ~330 s with them)
#   pressure   only lifecycle's preemption tests (k4v3 and exact engines), e.g. with KAKEYA_TAIL_STORAGE=pages exported
#   chunk      tests/test_vllm_chunk_gpu.py (KAKEYA_PREFILL_ATTEND=chunk: first token = FLASH_ATTN's, aligned = blocks)
#   flash      only lifecycle's KAKEYA_EXACT_ATTENTION=flash engines (strict 8/8 vs FLASH_ATTN + FA boundary layers)
#   soak       benchmarks/soak/soak.py -> $OUT/soak.json + soak.server.log (not yet run; its own call:
#              SUITE_BUDGET_S=540, it uses all that is left; soak.json is written even when the cap cuts it)
#   tp         tests/test_vllm_tp.py (needs the 2-GPU kind)
#   perlayer   tests/test_vllm_perlayer_gpu.py (KAKEYA_LAYER_BITS in vLLM)
#   scratch    tests/test_vllm_scratch_gpu.py (KAKEYA_PREFILL_VARIANT=candidate:scratch: tokens vs tuned, fallbacks
#              past KAKEYA_SCRATCH_MIB, the reservation counted by vLLM's profiling; not yet run)
#   graphs     tests/test_vllm_graphs_gpu.py (KAKEYA_CUDA_GRAPHS=1: full decode graphs vs the eager path; not yet run)
#   v13        tests/test_v13_triton.py on the GPU (seal/decode/fused attention parity, GPU seal vs CPU encoding)
#              + tests/test_vllm_v13_gpu.py (KAKEYA_FORMAT=v13 PPL vs FLASH_ATTN; carry .gpudata)
# Stages nothing: the kit's chunks must already be in /tmp/stage (carry .gpukit/b .gpukit/setup.sh and the
# .gpuwheels pytest wheels: the device has no pytest). Each part runs in its own process group under a time cap
# (SUITE_BUDGET_S for the whole job incl. setup, default 540 s); what a part leaves behind is killed after it.
# Output in $OUT: suite_<part>.txt (pytest output), gpu_test_record.jsonl (diagnostics), soak.json; a table last.
set -u
OUT=${OUT:-/tmp/suite_out}
mkdir -p "$OUT"
T0=$(date +%s)
DEADLINE=$(( T0 + ${SUITE_BUDGET_S:-540} ))
source .gpukit/setup.sh >/dev/null 2>&1 || { echo "gpu-kit setup failed (stage chunks missing?)"; exit 3; }
source scripts/device_install.sh
source scripts/triton_cache.sh restore
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .gpuwheels/*.whl >/dev/null 2>&1
export PYTHONPATH=${PYTHONPATH:-}:/tmp/pyt PYTHONUNBUFFERED=1 GPU_TEST_RECORD=$OUT/gpu_test_record.jsonl
python3 -c "import pytest" 2>/dev/null || { echo "no pytest: carry .gpuwheels (pytest, iniconfig, pluggy, packaging)"; exit 3; }
[ -f /tmp/models/SmolLM2-135M-Instruct/config.json ] || echo "WARNING: no SmolLM2 model (kit built without --with-smollm2?)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
echo "setup took $(( $(date +%s) - T0 )) s"

declare -A RESULT SECONDS_USED
PARTS=()
# run_part NAME CAP_S CMD...: capped by the remaining budget; the part's whole process group is killed afterwards.
run_part() {
  local name=$1 cap=$2; shift 2
  PARTS+=("$name")
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 45 )); then RESULT[$name]="not run (job budget spent)"; SECONDS_USED[$name]=0; return; fi
  (( cap > left )) && cap=$left
  local t=$(date +%s)
  echo "== $name (cap ${cap} s)"
  setsid timeout -s INT -k 20 "$cap" "$@" > "$OUT/suite_$name.txt" 2>&1 &
  local pid=$!
  wait $pid
  local rc=$?
  kill -KILL -- -$pid 2>/dev/null
  SECONDS_USED[$name]=$(( $(date +%s) - t ))
  local summary
  summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)|^(=+ )?no tests ran|Interrupted" "$OUT/suite_$name.txt" \
            | tail -1 | tr -d '=' | sed 's/^ *//')
  (( rc == 124 )) && summary="TIMED OUT at ${cap} s; ${summary:-no summary}"
  RESULT[$name]="rc=$rc ${summary:-(see suite_$name.txt)}"
  grep -E "^(FAILED|ERROR) " "$OUT/suite_$name.txt" | head -12
}

PYTEST="python3 -m pytest -q -p no:cacheprovider -m gpu -rfE --tb=short"
for part in "${@:-core lifecycle}"; do
  for p in $part; do
    case $p in
      core)      run_part core 200 $PYTEST tests/test_vllm_gpu.py ;;
      lifecycle) run_part lifecycle 450 $PYTEST tests/test_vllm_lifecycle.py ;;
      chunk)     run_part chunk 240 $PYTEST tests/test_vllm_chunk_gpu.py ;;   # 5 SmolLM2 engines (not yet run)
      flash)     run_part flash 240 $PYTEST tests/test_vllm_lifecycle.py -k "exact_flash or k4v3_b_flash" ;;
      pressure)  run_part pressure 240 $PYTEST tests/test_vllm_lifecycle.py -k "preempt and (k4v3] or exact])" ;;
      tp)        run_part tp 300 $PYTEST tests/test_vllm_tp.py ;;
      perlayer)  run_part perlayer 200 $PYTEST tests/test_vllm_perlayer_gpu.py ;;
      scratch)   run_part scratch 240 $PYTEST tests/test_vllm_scratch_gpu.py ;;   # 4 engines (not yet run)
      graphs)    run_part graphs 320 $PYTEST tests/test_vllm_graphs_gpu.py ;;   # 6 engines: > 208 s (session 9)
      v13)       run_part v13 300 ${PYTEST/ -m gpu/} tests/test_v13_triton.py tests/test_vllm_v13_gpu.py ;;
      soak)      left=$(( DEADLINE - $(date +%s) ))
                 run_part soak $left python3 benchmarks/soak/soak.py --out "$OUT/soak.json" --deadline-s $(( left - 30 ))
                 [ -f "$OUT/soak.json" ] && RESULT[soak]="${RESULT[soak]} $(python3 -c "import json; r = json.load(open('$OUT/soak.json')); print({k: r.get(k) for k in ('requests', 'planned', 'errors', 'aborted', 'kv_usage_end', 'mem_growth_mb', 'passed', 'mode', 'cut_short')})")" ;;
      *)         echo "unknown part $p (core lifecycle pressure chunk flash soak tp perlayer graphs scratch v13)"; exit 2 ;;
    esac
  done
done

echo
printf '%-10s %6s  %s\n' part secs result
for p in "${PARTS[@]}"; do printf '%-10s %6s  %s\n' "$p" "${SECONDS_USED[$p]}" "${RESULT[$p]}"; done
source scripts/triton_cache.sh save
echo "total $(( $(date +%s) - T0 )) s"
