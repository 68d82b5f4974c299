#!/usr/bin/env bash
# The main job on its embedded default: every KV format on real text (SmolLM2 + Jane Austen), CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
exec kakeya-kv compare "$@"
