#!/usr/bin/env bash
# The test suite, exactly as CI runs it: set up the venv, lint, run pytest against the real data in ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/setup.sh | tail -1)
export XKE_DATA_DIR="${XKE_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$venv/bin/ruff" check .
"$venv/bin/python" -m pytest -q tests "$@"
