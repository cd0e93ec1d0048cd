"""SERAC's scope classifier (Mitchell et al. 2022, arXiv 2206.06520), embedding variant, built on the base model.

The paper's classifier embeds the edit and the question with a small encoder and scores their cosine similarity.
Offline, the encoder here is the base model itself: the mean of one block's output over the text's tokens, frozen,
followed by a trained linear projection; ``p(in scope) = sigmoid(scale * cos + bias)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm_eval_xke.training import RunningNorm


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
