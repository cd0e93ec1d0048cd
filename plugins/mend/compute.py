"""The math of MEND (Mitchell et al. 2022, arXiv 2110.11309), one small piece per part of the paper.

For a linear layer ``y = W u`` the gradient of a loss over tokens t is the sum of rank-one terms
``dL/dW = sum_t delta_t u_t^T`` with ``u_t`` the layer's input and ``delta_t = dL/dy_t``. MEND never forms it: a
small MLP ``g`` maps each normalised pair ``(u_t, delta_t)`` to ``(u~_t, delta~_t)`` and the edit is
``W' = W - lr * sum_t delta~_t u~_t^T``, a rank-T update. One ``g`` is shared by the edited layers of one shape,
with a per-layer scale and shift (the paper's layer embedding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from lm_eval_xke.editing.hooks import trace_module
from lm_eval_xke.editing.model_state import frozen_parameters
from lm_eval_xke.editing.teacher_forcing import EditBatch, target_log_probs


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight ``[in, out]``, the transpose of ``nn.Linear``."""
    return type(module).__name__ == "Conv1D"


def per_request_nll(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each request's target tokens, ``[n]``."""
    return -(log_probs * mask).sum(1) / mask.sum(1)


def gradient_factors(model, names: Sequence[str], batch: EditBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One forward and backward of the edit loss: per module, ``(u, delta)`` at every token of the batch (float32).

    The loss is the sum over requests of their mean target NLL, so each request's factors are those of its own
    edit whatever the batch size (a batch edit is the sum of the single edits' gradients, as in the paper).
    Only the edited weights take part in autograd, so the backward stops at the first edited layer.
    """
    modules = [model.get_submodule(name) for name in names]
    with frozen_parameters(model), contextlib.ExitStack() as stack:
        for module in modules:
            module.weight.requires_grad_(True)
        records = [stack.enter_context(trace_module(module)) for module in modules]
        loss = per_request_nll(target_log_probs(model, batch, "target_new"), batch.target_mask).sum()
        grads = torch.autograd.grad(loss, [record["output"] for record in records])
    # every real token: the prompt's hidden states reach the targets through attention, so their factors are part
    # of the gradient too (the paper's code keeps every position whose factors are non-zero)
    rows, cols = batch.attention_mask.nonzero(as_tuple=True)
    return {
        name: (record["input"][rows, cols].detach().float(), grad[rows, cols].float())
        for name, record, grad in zip(names, records, grads, strict=True)
    }


class LowRankResidual(nn.Module):
    """``x + act((U V x + b) * scale[layer] + shift[layer])`` with ``U`` zero at init, so the block starts as the
    identity (the paper's identity initialisation) and the editor starts from the plain gradient."""

    def __init__(self, dim: int, rank: int, n_layers: int, relu: bool) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.v = nn.Parameter(torch.randn(rank, dim) / dim**0.5)
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        pre = (x @ self.v.T) @ self.u.T + self.bias
        pre = pre * self.scale[layer] + self.shift[layer]
        return x + (torch.relu(pre) if self.relu else pre)


class GradientTransform(nn.Module):
    """``g``: the MLP over the concatenated normalised ``[u, delta]`` of one token, shared by same-shape layers."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, n_hidden: int, n_layers: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.blocks = nn.ModuleList(
            LowRankResidual(in_dim + out_dim, rank, n_layers, relu=i < n_hidden) for i in range(n_hidden + 1)
        )

    def forward(self, u: torch.Tensor, delta: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([u, delta], dim=-1)
        for block in self.blocks:
            x = block(x, layer)
        return x[:, : self.in_dim], x[:, self.in_dim :]


class WithWeights:
    """Call ``model`` with some parameters replaced (differentiably), leaving the model itself untouched."""

    def __init__(self, model, weights: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self.weights = dict(weights)

    def __call__(self, **kwargs):
        return functional_call(self.model, self.weights, args=(), kwargs=kwargs)


def read_log_probs(model, batch: EditBatch) -> torch.Tensor:
    """Full next-token log-distributions at every target position, ``[n, max_target, vocab]`` (float32)."""
    keep, column = torch.unique(batch.read_cols, sorted=True, return_inverse=True)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    rows = torch.arange(len(batch.read_cols), device=logits.device)[:, None]
    return logits[rows, column].float().log_softmax(-1)


def locality_kl(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(p_pre || p_post)`` per unrelated-answer token, averaged (the paper's L_loc)."""
    kl = (pre.exp() * (pre - post)).sum(-1)
    return (kl * mask).sum() / mask.sum()
