"""Reading a causal LM's hidden states: padding, its list of blocks, and mean-pooled block outputs.

Shared by the editors that embed text with the evaluated model itself (SERAC's scope classifier, ReMaKE's
retriever), by the weight editors that batch prompts (``padding_id``), and by the read-out and the value
optimisation, which project only the positions they read onto the vocabulary (``project_reads``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lm_eval_xke.editing.hooks import module_io
from lm_eval_xke.editing.tokens import pad_right


def padding_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end of sequence, else 0 (masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def decoder_blocks(model) -> nn.ModuleList:
    """The model's list of transformer blocks (``model.layers``, GPT-2's ``transformer.h``...)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise ValueError(f"no list of {model.config.num_hidden_layers} blocks found in {type(model).__name__}")


@torch.no_grad()
def mean_pooled(model, tokenizer, block: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """The block's output averaged over each text's tokens, ``[n, hidden]`` float32 (one padded forward pass)."""
    device = next(model.parameters()).device
    input_ids, mask = pad_right([tokenizer(t)["input_ids"] for t in texts], padding_id(tokenizer), device)
    output = module_io(model, block, input_ids=input_ids, attention_mask=mask)["output"]
    hidden = output[0] if isinstance(output, tuple) else output
    weights = mask[..., None].float()
    return (hidden.float() * weights).sum(1) / weights.sum(1)


@contextlib.contextmanager
def project_reads(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """Let the output embedding project only the hidden states at ``(rows[i], cols[i])``: logits
    ``[1, n_reads, vocab]``.

    Projecting every position onto the vocabulary is a large share of the cost (a fifth of SmolLM2-135M's FLOPs)
    and most of the memory (positions x vocabulary floats); a read-out or a loss needs a handful of positions per row.
    """

    def hook(_module, args):
        return (args[0][rows, cols][None], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
