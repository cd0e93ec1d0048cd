"""Fine-tuning towards new targets: the edit batch, the two objectives, the optimiser loop and the L-inf clamp.

FT-L and FT-M differ only in their loss (EasyEdit's ``objective_optimization``):

- ``prompt_last`` (FT-L, ROME's FT baseline): every target token is scored at the prompt's *last* position, i.e.
  ``-mean_j log p(t_j | prompt)``, one next-token distribution for the whole target.
- ``target_new`` (FT-M, Zhang et al. 2024): teacher forcing, ``-mean_j log p(t_j | prompt, t_<j)``, the loss masked
  to the target tokens.

The LoRA editor trains with the same teacher-forced loss and optimiser loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from lm_eval_xke.editing.teacher_forcing import EditBatch, target_log_probs


def mean_nll(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each request's target tokens, then over the requests (EasyEdit's FT loss)."""
    per_request = -(log_probs * mask).sum(1) / mask.sum(1)
    return per_request.mean()


def edit_loss(model, batch: EditBatch, objective: str) -> torch.Tensor:
    return mean_nll(target_log_probs(model, batch, objective), batch.target_mask)


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float):
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    return optimizers[name](list(params), lr=lr, weight_decay=weight_decay)


@dataclass
class TrainResult:
    steps: int  # optimiser steps taken
    initial_loss: float
    final_loss: float  # the loss of the last forward pass (before the step it may have triggered)


def train(
    loss_fn: Callable[[], torch.Tensor],
    optimizer,
    num_steps: int,
    early_stop_loss: float,
    after_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Minimise ``loss_fn`` for up to ``num_steps`` steps; stop before stepping once the loss is below the threshold."""
    losses: list[float] = []
    steps = 0
    with torch.enable_grad():
        for _ in range(num_steps + 1):  # the extra pass measures the loss after the last step
            loss = loss_fn()
            losses.append(loss.item())
            if losses[-1] < early_stop_loss or steps == num_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if after_step is not None:
                after_step()
    return TrainResult(steps=steps, initial_loss=losses[0], final_loss=losses[-1])


@torch.no_grad()
def clamp_around(params: Mapping[str, torch.nn.Parameter], originals: Mapping[str, torch.Tensor], eps: float) -> None:
    """Project every weight back into the L-infinity ball of radius ``eps`` around its original (Zhu et al. 2020)."""
    for name, param in params.items():
        param.copy_(torch.clamp(param, min=originals[name] - eps, max=originals[name] + eps))
