"""Fine-tuning towards new targets: the edit batch, the two objectives, the optimiser loop and the L-inf clamp.

FT-L and FT-M differ only in their loss (EasyEdit's ``objective_optimization``):

- ``prompt_last`` (FT-L, ROME's FT baseline): every target token is scored at the prompt's *last* position, i.e.
  ``-mean_j log p(t_j | prompt)``, one next-token distribution for the whole target.
- ``target_new`` (FT-M, Zhang et al. 2024): teacher forcing, ``-mean_j log p(t_j | prompt, t_<j)``, the loss masked
  to the target tokens.

The LoRA editor trains with the same teacher-forced loss and optimiser loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.hidden_states import padding_id
from lm_eval_xke.plugins.rome.compute import split_prompt_target
from lm_eval_xke.stats import pad_right

OBJECTIVES = ("prompt_last", "target_new")


@dataclass
class EditBatch:
    """``prompt + target[:-1]`` per request, right-padded, and where each target token is read.

    Row r's target token j is predicted at ``read_cols[r, j] = prompt_len - 1 + j`` (teacher forcing); the
    prompt's last position is ``read_cols[r, 0]``. ``target_mask`` marks real (unpadded) target tokens.
    """

    input_ids: torch.Tensor  # [n, width]
    attention_mask: torch.Tensor  # [n, width]
    target_ids: torch.Tensor  # [n, max_target]
    target_mask: torch.Tensor  # [n, max_target], bool
    read_cols: torch.Tensor  # [n, max_target]


def build_edit_batch(tokenizer, requests: Sequence[EditRequest], device) -> EditBatch:
    """Tokenize every request as the teacher-forced evaluation does (``split_prompt_target``) and batch them."""
    pairs = [split_prompt_target(tokenizer, r.prompt, r.target_new) for r in requests]
    input_ids, attention_mask = pad_right([p + t[:-1] for p, t in pairs], padding_id(tokenizer), device)
    longest = max(len(t) for _, t in pairs)
    target_ids = torch.zeros((len(pairs), longest), dtype=torch.long)
    target_mask = torch.zeros((len(pairs), longest), dtype=torch.bool)
    read_cols = torch.zeros((len(pairs), longest), dtype=torch.long)
    for row, (prompt, target) in enumerate(pairs):
        target_ids[row, : len(target)] = torch.tensor(target)
        target_mask[row, : len(target)] = True
        # padded slots read the last real position, so every index stays inside the row
        read_cols[row] = len(prompt) - 1 + torch.arange(longest).clamp_max(len(target) - 1)
    return EditBatch(input_ids, attention_mask, target_ids.to(device), target_mask.to(device), read_cols.to(device))


def target_log_probs(model, batch: EditBatch, objective: str) -> torch.Tensor:
    """``log p`` of every target token, ``[n, max_target]`` (float32; padded slots are garbage, mask them)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    cols = batch.read_cols if objective == "target_new" else batch.read_cols[:, :1].expand_as(batch.read_cols)
    keep, column = torch.unique(cols, sorted=True, return_inverse=True)  # project only the read positions
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    rows = torch.arange(len(cols), device=cols.device)[:, None]
    log_probs = logits[rows, column].float().log_softmax(-1)
    return log_probs.gather(-1, batch.target_ids[..., None]).squeeze(-1)


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
