"""SERAC's scope classifier (Mitchell et al. 2022, arXiv 2206.06520), embedding variant, built on the base model.

The paper's classifier embeds the edit and the question with a small encoder and scores their cosine similarity.
Offline, the encoder here is the base model itself: the mean of one block's output over the text's tokens, frozen,
followed by a trained linear projection; ``p(in scope) = sigmoid(scale * cos + bias)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lm_eval_xke.plugins.mend.compute import RunningNorm
from lm_eval_xke.plugins.rome.compute import padding_id
from lm_eval_xke.stats import pad_right


class _Stop(Exception):
    """Raised after the pooled block ran: the later blocks are not needed."""


def decoder_blocks(model) -> nn.ModuleList:
    """The model's list of transformer blocks (``model.layers``, GPT-2's ``transformer.h``...)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise ValueError(f"no list of {model.config.num_hidden_layers} blocks found in {type(model).__name__}")


@contextlib.contextmanager
def stop_after(block: nn.Module, record: dict) -> Iterator[None]:
    def hook(_module, _args, output):
        record["hidden"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def mean_pooled(model, tokenizer, block: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """The block's output averaged over each text's tokens, ``[n, hidden]`` float32 (one padded forward pass)."""
    device = next(model.parameters()).device
    input_ids, mask = pad_right([tokenizer(t)["input_ids"] for t in texts], padding_id(tokenizer), device)
    record: dict = {}
    with stop_after(block, record), contextlib.suppress(_Stop):
        model(input_ids=input_ids, attention_mask=mask)
    weights = mask[..., None].float()
    return (record["hidden"].float() * weights).sum(1) / weights.sum(1)


class ScopeHead(nn.Module):
    """Standardisation, projection to ``proj_dim``, and the logistic scale/bias over the cosine of two projected
    embeddings. Standardising (running statistics, frozen after training) removes the direction that all hidden
    states share, which otherwise makes every pair look similar."""

    def __init__(self, hidden: int, proj_dim: int) -> None:
        super().__init__()
        self.norm = RunningNorm(hidden)
        self.proj = nn.Linear(hidden, proj_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-5.0))  # at init, cos 0.5 is the boundary

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.norm.update(embeddings)
        return F.normalize(self.proj(self.norm(embeddings)), dim=-1)

    def logits(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[q, k]`` in-scope logits of every (question, edit) pair, from encoded vectors."""
        return self.log_scale.exp() * queries @ keys.T + self.bias


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over positives and over negatives separately, then summed (negatives of a
    batch outnumber its positives by about the batch size)."""
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return losses[labels > 0].mean() + losses[labels == 0].mean()
