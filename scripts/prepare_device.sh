#!/usr/bin/env bash
# CPU side, before a GPU session: build everything the device jobs carry (all git-ignored, never committed).
#   .gpukit/    vLLM 0.26 kit (../shared/gpu-kit/build.sh --with-fa2 --with-smollm2); stage chunks s0..sN
#   .gpuwheels/ pytest + deps as py3 wheels (the device image has no pytest)
#   .gpudata/   evaluation windows + NIAH prompts for benchmarks/vllm/quality_job.sh
# Usage: bash scripts/prepare_device.sh [--no-kit]
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=../shared/gpu-kit/build.sh
if [ "${1:-}" != "--no-kit" ] && [ ! -f .gpukit/setup.sh ]; then
  [ -x "$KIT" ] || { echo "no $KIT (the gpu-kit lives in ../shared)"; exit 2; }
  bash "$KIT" .gpukit --with-fa2 --with-smollm2
fi
mkdir -p .gpuwheels
ls .gpuwheels/pytest-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 -d .gpuwheels pytest iniconfig pluggy packaging
[ -f .venv/bin/activate ] || bash scripts/bootstrap.sh
. .venv/bin/activate
[ -f .gpudata/windows.json ] || python -m kakeya_kv.vllm_eval prep
echo "stage chunks: $(ls -d .gpukit/s[0-9]* 2>/dev/null | wc -l)  (one device call each: mkdir -p /tmp/stage && cp .gpukit/sN/* /tmp/stage/)"
du -sh .gpukit/b .gpuwheels .gpudata 2>/dev/null || true
