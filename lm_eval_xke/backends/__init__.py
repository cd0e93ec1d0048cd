"""Answering backends for the `xke` model: `hf` (lm-eval's HFLM, the reference) and `vllm` (the `[vllm]` extra)."""
