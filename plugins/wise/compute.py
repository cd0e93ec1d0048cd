"""The math of WISE (Wang et al. 2024, arXiv 2405.14768), one small function per piece of the paper.

A side memory ``W'`` is a copy of one FFN output projection ``W``; it is kept as ``D = W' - W``. For an input
activation ``a`` (the module's input) the side output is ``W a + D a`` and the activation score is ``||D a||``
(the paper's ``||A(x) (W'_v - W_v)||``), averaged over a sequence's tokens. An edit trains ``D`` on a random subset
of its entries (the shard's gradient mask) with the target NLL plus the routing loss ``L_a``; shards are merged
with TIES (``ties_merge``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hooks import module_io
from lm_eval_xke.editing.rewriting import ValueBatch
from lm_eval_xke.editing.tokens import pad_right, split_prompt_target

from .config import WiseHyperParams

#: EasyEdit's early stop: the loss is below this and changed by less than EARLY_STOP_CHANGE since the last step.
EARLY_STOP_LOSS = 0.02
EARLY_STOP_CHANGE = 1e-4
#: From the second merge on, the previous merged memory keeps this weight and the new shards share the rest (EasyEdit).
PREVIOUS_MERGE_WEIGHT = 0.6


# ---------------------------------------------------------------- activation scores and the routing loss


def apply_delta(module: torch.nn.Module, inputs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``D a`` for every input row, float32; ``delta`` is in the weight's layout (Linear ``[out, in]``, GPT-2's
    ``Conv1D`` ``[in, out]``)."""
    x = inputs.float()
    return x @ delta.T if isinstance(module, torch.nn.Linear) else x @ delta


def sequence_scores(side: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean activation score ``||D a_t||`` over each sequence's real tokens: ``side`` is ``D a``, ``[batch, tokens,
    d_out]``; ``valid`` the ``[batch, tokens]`` mask of real tokens."""
    return (side.norm(dim=-1) * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def _active_mean(hinge: torch.Tensor) -> torch.Tensor:
    """Mean of the positive hinge terms, 0 if none is (EasyEdit averages only the violated margins)."""
    active = hinge[hinge > 0]
    return active.mean() if active.numel() else hinge.new_zeros(())


def routing_loss(edit: torch.Tensor, irrelevant: torch.Tensor, hp: WiseHyperParams) -> torch.Tensor:
    """The paper's ``L_a``: irrelevant scores below ``alpha``, edit scores above ``beta``, and every edit score at
    least ``gamma`` above every irrelevant one."""
    return (
        _active_mean(irrelevant[:, None] - edit[None, :] + hp.gamma)
        + _active_mean(irrelevant - hp.alpha)
        + _active_mean(hp.beta - edit)
    )


# ---------------------------------------------------------------- knowledge shards and merging


def random_mask(shape: torch.Size, ratio: float, seed: int, device) -> torch.Tensor:
    """A shard's gradient mask: each entry trainable with probability ``ratio`` (private generator, reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < ratio).to(device)


def sparsify(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trimming: keep the ``density`` fraction of entries with the largest magnitude, zero the rest."""
    k = int(density * delta.numel())
    if k >= delta.numel():
        return delta
    kept = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    kept[delta.abs().reshape(-1).topk(k).indices] = True
    return torch.where(kept.view_as(delta), delta, torch.zeros_like(delta))


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023) of task vectors ``D_i = W'_i - W``: trim each to its largest entries, elect
    the sign of the weighted sum per entry, and average the weighted entries that agree with it (EasyEdit's
    ``GTA('magnitude', 'sum', normalize=True)``). Returns the merged ``D``."""
    stacked = torch.stack([sparsify(d, density) for d in deltas])
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    weighted = stacked * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (stacked.sign() == elected).to(stacked.dtype)
    divisor = (w * agree).sum(0)
    return (weighted * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def merge_weights(n_shards: int, has_previous: bool) -> list[float]:
    """Equal weights for the shards; with a previous merged memory, it keeps ``PREVIOUS_MERGE_WEIGHT`` (last)."""
    if not has_previous:
        return [1.0 / n_shards] * n_shards
    return [(1 - PREVIOUS_MERGE_WEIGHT) / n_shards] * n_shards + [PREVIOUS_MERGE_WEIGHT]


# ---------------------------------------------------------------- the rows an edit trains on


def build_edit_batch(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str], device) -> ValueBatch:
    """Rows ``template.format(prompt) + target[:-1]`` for every request and template; each row's target NLL is the
    mean over its tokens, and the loss the mean over rows. ``positions`` hold each row's last prompt token."""
    rows: list[list[int]] = []
    targets: list[tuple[int, list[int]]] = []  # (first predicting position, target ids) per row
    for request in requests:
        for template in templates:
            prompt_ids, target_ids = split_prompt_target(tokenizer, template.format(request.prompt), request.target_new)
            rows.append(prompt_ids + target_ids[:-1])
            targets.append((len(prompt_ids) - 1, target_ids))
    return ValueBatch(
        rows=rows,
        positions=[start for start, _ in targets],
        read_rows=torch.tensor([r for r, (_, ids) in enumerate(targets) for _ in ids], device=device),
        read_cols=torch.tensor([start + j for start, ids in targets for j in range(len(ids))], device=device),
        t_ids=torch.tensor([i for _, ids in targets for i in ids], device=device),
        t_weight=torch.tensor([1 / len(ids) / len(targets) for _, ids in targets for _ in ids], device=device),
    )


@torch.no_grad()
def module_inputs(model, module, rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input at every position of ``rows`` (right-padded) and the ``[rows, tokens]`` real-token mask."""
    input_ids, mask = pad_right(rows, pad_id, next(model.parameters()).device)
    return module_io(model, module, input_ids=input_ids, attention_mask=mask)["input"], mask.float()


def aligned_forward(model, batch: ValueBatch, pad_id: int) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """Log-probs ``[n_reads, vocab]`` at the batch's reads as a function of no argument, and the real-token mask.

    The rows are left-padded with explicit position ids, so every row ends with its target tokens in the last
    columns and the vocabulary is projected only there (``logits_to_keep``): right-padded rows would need the
    union of all rows' read columns, a few times as many.
    """
    device = next(model.parameters()).device
    width = max(len(row) for row in batch.rows)
    input_ids = torch.full((len(batch.rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(batch.rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    lengths = torch.tensor([len(row) for row in batch.rows], device=device)
    columns = width - lengths[batch.read_rows] + batch.read_cols
    first = int(columns.min())
    # a tensor of columns, not an int: HF slices with an int, and the strided slice makes the projection a slow bmm
    keep = torch.arange(first, width, device=device)

    def run() -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep).logits
        return logits[batch.read_rows, columns - first].float().log_softmax(-1)

    return run, mask.float()


# ---------------------------------------------------------------- skipping the blocks before the side memory


def decoder_blocks(model, module_name: str) -> tuple[torch.nn.ModuleList, int] | None:
    """The list of transformer blocks that holds ``module_name``, and the index of its block (None if not found)."""
    parts = module_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit():
            container = model.get_submodule(".".join(parts[:i]))
            if isinstance(container, torch.nn.ModuleList):
                return container, int(parts[i])
    return None


@contextlib.contextmanager
def recorded_outputs(blocks: Sequence[torch.nn.Module]) -> Iterator[list]:
    """The outputs of ``blocks`` in the next forward pass, in order."""
    outputs: list = [None] * len(blocks)
    handles = [
        block.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
        for i, block in enumerate(blocks)
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def replayed_blocks(blocks: Sequence[torch.nn.Module], outputs: Sequence) -> Iterator[None]:
    """Make ``blocks`` return their recorded ``outputs`` without computing.

    The side memory sits after them, so their outputs are the same at every training step; only the blocks from
    the edited one on run (the model's own forward still builds masks, norms and logits).
    """
    saved = [block.__dict__.get("forward") for block in blocks]  # an instance-level forward (accelerate) is kept
    for block, output in zip(blocks, outputs, strict=True):
        block.forward = lambda *_args, _output=output, **_kwargs: _output
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


# ---------------------------------------------------------------- training one edit


@torch.no_grad()
def masked_sgd_step(delta: torch.Tensor, mask: torch.Tensor, main: torch.Tensor, hp: WiseHyperParams) -> None:
    """``W' -= lr (grad + weight_decay W')`` on the masked entries only, then ``|W' - W| <= norm_constraint``."""
    step = hp.edit_lr * (delta.grad + hp.weight_decay * (main + delta))
    updated = (delta - step).clamp(-hp.norm_constraint, hp.norm_constraint)
    delta.copy_(torch.where(mask, updated, delta))
