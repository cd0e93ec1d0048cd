"""Answering backends for the `xke` model: `hf` (reference, always there) and, later, `vllm`."""
