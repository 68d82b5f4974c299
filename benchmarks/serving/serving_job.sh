#!/usr/bin/env bash
# Device job for issue 6 (main ran once: session 8, benchmarks/results/vllm_s8/serving). One mode per device call:
#   bash benchmarks/serving/serving_job.sh issue6       # issue 6's rows, all in CUDA-graph mode (rows.PLANS["issue6"]),
#                                                       #   over several back-to-back calls on one warm machine (pass
#                                                       #   --rows for the rows a previous call did not reach)
#   bash benchmarks/serving/serving_job.sh main         # 1x H200: rows of plan "main" -> $OUT/serving_main.json
#   bash benchmarks/serving/serving_job.sh more         # 1x H200: the rows "main" had no time for -> serving_more.json
#   bash benchmarks/serving/serving_job.sh rest         # 1x H200: after session 8's main call: its unrun rows except
#                                                       #   TurboQuant -> serving_rest.json
#   bash benchmarks/serving/serving_job.sh tq           # 1x H200: the TurboQuant rows alone (330 s row limit, each
#                                                       #   needs >= 240 s left to start) -> serving_tq.json
#   bash benchmarks/serving/serving_job.sh sweep        # 1x H200: TPOT/TTFT rate sweep, OpenAI server -> serving_sweep.json
#   bash benchmarks/serving/serving_job.sh decode_step  # 1x H200: decode ms/step + top kernels -> decode_step.json
#   bash benchmarks/serving/serving_job.sh tp2          # nvidia-h200-x2: plan "tp2" with --tp 2 -> serving_tp2.json
# Extra arguments go to the python command (e.g. --rows qwen3-8b-like:kakeya). CALL_S (env, default 550) is the
# device call's limit: the python side stops 30 s before it so that $OUT comes back complete.
# carry: .gpukit/b .gpukit/setup.sh .gpudata (kit built --with-fa2 for the TurboQuant rows, --with-smollm2 for the
# SmolLM2 rows; stage chunks already copied into /tmp/stage). Merge on the CPU afterwards:
#   python -m benchmarks.serving.serve_bench report --inputs serving_main.json [serving_rest.json serving_tq.json \
#       serving_tp2.json] [--sweep serving_sweep.json] [--kernels kernels.json] --out benchmarks/results/serving.json
set -u
T0=$(date +%s)
MODE=${1:?usage: serving_job.sh issue6|main|more|rest|tq|sweep|decode_step|tp2 [extra args]}; shift
CALL_S=${CALL_S:-550}
source .gpukit/setup.sh >/dev/null 2>&1 || { echo "gpu-kit setup failed (are the stage chunks in /tmp/stage?)"; exit 3; }
source scripts/device_install.sh
source scripts/triton_cache.sh restore     # carry .gpudata: kernels compiled by an earlier call load from cache
# The dummy-weight models are config.json folders: nothing may try the hub (the device has no network).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
LEFT=$(( CALL_S - ($(date +%s) - T0) - 30 ))
echo "setup took $(( $(date +%s) - T0 ))s; ${LEFT}s left for $MODE"
SB="python3 -m benchmarks.serving.serve_bench"
case $MODE in
  main|more|rest|tq|issue6) $SB run --rows "$MODE" --contexts 32768,8192 --deadline-s $LEFT --log-dir "$OUT/logs" \
               --out "$OUT/serving_$MODE.json" "$@" ;;
  tp2)       $SB run --rows tp2 --tp 2 --contexts 32768,8192 --deadline-s $LEFT --log-dir "$OUT/logs" \
               --out "$OUT/serving_tp2.json" "$@" ;;
  sweep)     $SB sweep --deadline-s $LEFT --log-dir "$OUT/logs" --out "$OUT/serving_sweep.json" "$@" ;;
  decode_step) python3 -m benchmarks.vllm.decode_step run --deadline-s $LEFT --log-dir "$OUT/logs" \
               --out "$OUT/decode_step.json" "$@" ;;
  *) echo "unknown mode $MODE"; exit 2 ;;
esac
rc=$?
ls -la "$OUT"
# Next session's compiles (Kakeya at head_dim 128, TurboQuant) come from this cache; only if the call has time.
(( CALL_S - ($(date +%s) - T0) > 20 )) && source scripts/triton_cache.sh save
echo "serving_job $MODE done in $(( $(date +%s) - T0 ))s (rc $rc)"
exit $rc
