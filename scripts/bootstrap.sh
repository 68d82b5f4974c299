#!/usr/bin/env bash
# Create .venv and install Kakeya KV with everything the CPU demo and tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch 2.13.0 CPU lies on these machines' disk; elsewhere pip fetches a build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>/dev/null || python -m pip install -q torch
python -m pip install -q -e ".[eval,test,kernels]"
