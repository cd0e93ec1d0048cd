"""Rewriting batches: prompts followed by their targets, a vector added to one module's output at one position
per row, and the log-probs read at the target tokens, on the full forward or on a KV cache of the prefixes.

ROME's and MEMIT's value optimisation, GRACE's value training and WISE's side-memory training all optimise such a
vector (or weights behind it) against the target tokens' NLL; they share the batch layout and both forward paths.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lm_eval_xke.editing.hidden_states import project_reads
from lm_eval_xke.editing.hooks import add_to_output, device_of, trace_module
from lm_eval_xke.editing.tokens import pad_right

# under lm-eval's logger tree, next to the xke model's lines
log = logging.getLogger("lm_eval.models.xke.editing")


@dataclass
class ValueBatch:
    """The rewriting prompts plus the KL prompt, and where the loss reads their next-token log-probs.

    The reads are every target token of every rewriting row, in row order, then the KL prompt's last token.
    """

    rows: list[list[int]]  # ``template.format(prompt) + target[:-1]`` per template, then ``"{subject} is a"``
    positions: list[int]  # fact token per row: where delta is added
    read_rows: torch.Tensor  # per read: its row
    read_cols: torch.Tensor  # per read: the position whose next-token distribution is read
    t_ids: torch.Tensor  # per target token (the first reads): its id
    t_weight: torch.Tensor  # per target token: 1 / len(target) / n_prompts (mean per prompt, then over prompts)


#: ``delta -> log-probs [n_reads, vocab]`` of a value batch with ``delta`` added at the fact tokens (None: nothing).
#: ``delta`` is one vector for every row or one per row (``[rows, d_out]``).
LogProbs = Callable[[torch.Tensor | None], torch.Tensor]


def _with_delta(module, positions: Sequence[int], delta: torch.Tensor | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if delta is None else add_to_output(module, positions, delta)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-probs of the reads, ``[n_reads, vocab]``, from ``project_reads``'s logits."""
    return logits[0].float().log_softmax(-1)


def full_forward(model, module, batch: ValueBatch, pad_id: int) -> LogProbs:
    """Every row from its first token, right-padded: the reference path."""
    input_ids, mask = pad_right(batch.rows, pad_id, device_of(model))

    def run(delta: torch.Tensor | None) -> torch.Tensor:
        with _with_delta(module, batch.positions, delta), project_reads(model, batch.read_rows, batch.read_cols):
            return _log_probs(model(input_ids=input_ids, attention_mask=mask).logits)

    return run


@dataclass
class Reference:
    """The unedited model on a value batch: what the loss compares against, and what stays fixed while optimising."""

    log_probs: torch.Tensor  # at the reads, [n_reads, vocab]
    keys: torch.Tensor  # module input at every row's fact token, float32 [rows, d_in]
    values: torch.Tensor  # module output there, float32 [rows, d_out]
    prefix: list[tuple] | None  # KV cache of the tokens before the fact tokens (``prefix_cache``)

    def select(self, rows: torch.Tensor, reads: torch.Tensor, width: int) -> Reference:
        """The reference of a sub-batch: those rows and reads, the prefixes cut to the sub-batch's ``width``."""
        prefix = None
        if self.prefix is not None and width > 0:
            # prefixes end at one common column, so a narrower sub-batch keeps the last `width` slots
            prefix = [(e[0][rows, :, -width:], e[1][rows, :, -width:], *e[2:]) for e in self.prefix]
        return Reference(self.log_probs[reads], self.keys[rows], self.values[rows], prefix)


@torch.no_grad()
def reference_pass(model, module, batch: ValueBatch, pad_id: int) -> Reference:
    """``full_forward`` at delta = 0, also recording the keys, the values and the prefixes' KV cache."""
    input_ids, mask = pad_right(batch.rows, pad_id, device_of(model))
    with trace_module(module) as record, project_reads(model, batch.read_rows, batch.read_cols):
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    rows = torch.arange(len(batch.rows), device=input_ids.device)
    positions = torch.tensor(batch.positions, device=input_ids.device)
    width = max(batch.positions)
    return Reference(
        log_probs=_log_probs(out.logits),
        keys=record["input"][rows, positions].float(),
        values=record["output"][rows, positions].float(),
        prefix=prefix_cache(out.past_key_values, batch.positions, input_ids.shape[1]) if width else None,
    )


def prefix_cache(cache, lengths: Sequence[int], total: int) -> list[tuple] | None:
    """The keys and values of each row's first ``lengths[row]`` tokens, left-padded to one common end.

    ``cache`` is the KV cache of the right-padded full rows (``total`` positions): row r's prefix occupies its
    first ``lengths[r]`` positions and already carries the positions 0..lengths[r]-1 it must keep (rotary or
    absolute). Moving every prefix to the right end of ``max(lengths)`` slots lets all suffixes continue at
    the same cache column; the slots before a shorter prefix hold copies of its first token, hidden by the
    attention mask. None for other cache classes and where a layer does not hold all ``total`` positions (a
    sliding window shorter than the rows, KV sharing): such a cache cannot be realigned.
    """
    entries = list(cache) if isinstance(cache, DynamicCache) else []
    if not entries or any(e[0] is None or e[0].shape[-2] != total for e in entries):
        return None
    width = max(lengths)
    device = entries[0][0].device
    shift = width - torch.tensor(lengths, device=device)[:, None]
    source = (torch.arange(width, device=device) - shift).clamp_min(0)  # [rows, width]: cache column per slot

    def realign(states: torch.Tensor) -> torch.Tensor:
        return states.gather(2, source[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1]))

    # a sliding-window layer keeps its window size (the third element), so the rebuilt cache is of its kind
    return [(realign(e[0]), realign(e[1]), *e[2:]) for e in entries]


def cached_forward(model, module, batch: ValueBatch, pad_id: int, prefix: list[tuple] | None) -> LogProbs:
    """The same log-probs as ``full_forward``, running only each row's suffix (fact token onward) per call.

    delta enters at the fact token, so every token before it sees the same model at every step: ``prefix``
    holds their keys and values (``prefix_cache``, left-aligned to one common end), and each call runs the
    suffixes (right-padded, with their own position ids) against a fresh cache built from it.
    """
    device = device_of(model)
    split = torch.tensor(batch.positions, device=device)
    suffix_ids, suffix_mask = pad_right(
        [row[p:] for row, p in zip(batch.rows, batch.positions, strict=True)], pad_id, device
    )
    position_ids = split[:, None] + torch.arange(suffix_ids.shape[1], device=device)
    width = max(batch.positions)
    prefix_mask = (torch.arange(width, device=device) >= width - split[:, None]).long()
    mask = torch.cat([prefix_mask, suffix_mask], dim=1)
    read_cols = batch.read_cols - split[batch.read_rows]
    fact_columns = [0] * len(batch.rows)  # the fact token opens every suffix

    def run(delta: torch.Tensor | None) -> torch.Tensor:
        # a fresh cache per call: the forward appends the suffixes' keys and values to it, while the prefix
        # tensors themselves are never written to
        cache = DynamicCache(prefix) if prefix is not None else None
        with _with_delta(module, fact_columns, delta), project_reads(model, batch.read_rows, read_cols):
            logits = model(
                input_ids=suffix_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
            ).logits
        return _log_probs(logits)

    return run


def paths_agree(cached: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the cached path reproduces the full forward's log-probs up to the model dtype's rounding."""
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    return bool(torch.allclose(cached, reference, rtol=0.0, atol=tolerance))


def value_forward(model, module, batch: ValueBatch, pad_id: int, reference: Reference) -> LogProbs:
    """The cached path where the prefixes' KV cache could be taken (or there are no prefixes), else the full one."""
    if reference.prefix is None and max(batch.positions) > 0:
        log.warning(
            "the KV cache of %s cannot be reused for the prefixes; using the full forward (slower)",
            model.config.model_type,
        )
        return full_forward(model, module, batch, pad_id)
    return cached_forward(model, module, batch, pad_id, reference.prefix)


def self_checked(
    model, module, batch: ValueBatch, pad_id: int, reference: Reference, forward: LogProbs, delta: torch.Tensor
) -> tuple[LogProbs, torch.Tensor]:
    """The first step's log-probs, and the forward to keep: ``forward`` if it reproduces the reference pass.

    delta is still 0 at the first step, so the cached path must give the reference log-probs. An architecture
    whose cache does not (e.g. one that ignores position ids) gets the full forward, with a warning: never a
    silently wrong answer.
    """
    log_probs = forward(delta)
    if paths_agree(log_probs.detach(), reference.log_probs, module.weight.dtype):
        return forward, log_probs
    log.warning(
        "the KV-cached value optimisation disagrees with the full forward on %s; using the full forward (slower)",
        model.config.model_type,
    )
    full = full_forward(model, module, batch, pad_id)
    return full, full(delta)


def target_nll(log_probs: torch.Tensor, batch: ValueBatch) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (the model's loss on the labels, as GRACE trains it)."""
    reads = torch.arange(len(batch.t_ids), device=batch.t_ids.device)
    return -(log_probs[reads, batch.t_ids] * batch.t_weight).sum()
