"""WISE's side memory of one FFN output projection, its routing hook and its per-edit snapshots.

The main memory ``W`` (the module's weight) is never changed. Every side memory is kept as its difference
``D = W' - W`` (float32, in the weight's own layout), so the side output is the module's own output plus ``D a``
and the activation score is ``||D a||``. A query (one sequence) is routed to the side memory with the highest mean
score over its tokens if that score exceeds the threshold learned in training; otherwise the module's own output
is kept bit for bit. Hooks exist only while the memory holds edits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch

from .compute import apply_delta, sequence_scores


@dataclass(eq=False)
class Shard:
    """One knowledge shard: the side-memory copy that a run of ``save_freq`` edits trains under one random mask."""

    delta: torch.Tensor  # D = W' - W, zero outside the mask
    mask: torch.Tensor  # bool, the entries its edits may change
    n_edits: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The memory as it was before one edit; the shard it trains in place keeps only its masked entries."""

    token: object
    merged: torch.Tensor | None
    shards: tuple[Shard, ...]
    current: Shard | None
    current_n_edits: int
    current_values: torch.Tensor | None  # current.delta[current.mask] before the edit, if the edit trains it
    n_edits: int
    n_scores: int


class SideMemory:
    """The WISE memory of one module; get it with :func:`memory_on`, never construct it directly."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module) -> None:
        self.module = module
        self.merged: torch.Tensor | None = None  # D of the TIES-merged side memory, after the first merge
        self.shards: list[Shard] = []  # finished shards not merged yet
        self.current: Shard | None = None  # the shard that the next edit trains
        self.scores: list[float] = []  # per edited request, its mean activation score at the end of training
        self.n_edits = 0
        self.act_ratio = 1.0
        #: while an edit trains: the D that every row uses, routing switched off
        self.training_delta: torch.Tensor | None = None
        self._attention_mask: torch.Tensor | None = None
        self._history: list[Snapshot] = []
        self._handles = [
            model.register_forward_pre_hook(self._remember_mask, with_kwargs=True),
            module.register_forward_hook(self._route),
        ]

    # ------------------------------------------------------------ inference

    def candidates(self) -> list[torch.Tensor]:
        """The side memories a query may be routed to: the merged one and every shard not merged yet."""
        shards = [s for s in [*self.shards, self.current] if s is not None and s.n_edits]
        return ([self.merged] if self.merged is not None else []) + [s.delta for s in shards]

    def threshold(self) -> float:
        return self.act_ratio * min(self.scores)

    def _remember_mask(self, _model, _args, kwargs):
        # the module sees hidden states only; padded positions must not count in a sequence's mean score
        self._attention_mask = kwargs.get("attention_mask")

    def _valid_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[batch, tokens]`` float mask of the real tokens of this forward pass (the last columns with a cache)."""
        batch, tokens = inputs.shape[:2]
        mask = self._attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < tokens:
            return torch.ones(batch, tokens, device=inputs.device)
        return mask[:, -tokens:].to(inputs.device, torch.float32)

    def _route(self, module, args, output):
        inputs = args[0]
        if self.training_delta is not None:
            return (output.float() + apply_delta(module, inputs, self.training_delta)).to(output.dtype)
        candidates = self.candidates()
        if not candidates:
            return None
        valid = self._valid_tokens(inputs)
        sides = torch.stack([apply_delta(module, inputs, delta) for delta in candidates])  # [memories, batch, ...]
        best_score, best = torch.stack([sequence_scores(side, valid) for side in sides]).max(dim=0)
        best_out = sides[best, torch.arange(len(best), device=best.device)]
        routed = best_score > self.threshold()
        if not bool(routed.any()):
            return None
        side_output = (output.float() + best_out).to(output.dtype)
        return torch.where(routed[:, None, None], side_output, output)

    # ------------------------------------------------------------ edits and their undo

    def begin(self, token: object, save_freq: int, new_shard: Callable[[], Shard]) -> Shard:
        """Snapshot the memory for edit ``token`` and return the shard it trains: the current one, or a
        ``new_shard()`` once the current one holds ``save_freq`` edits (or after a merge)."""
        current = self.current
        rotate = current is None or current.n_edits >= save_freq
        fresh = new_shard() if rotate else current  # before the snapshot: a failure here leaves nothing to undo
        self._history.append(
            Snapshot(
                token=token,
                merged=self.merged,
                shards=tuple(self.shards),
                current=current,
                current_n_edits=current.n_edits if current is not None else 0,
                current_values=None if rotate else current.delta[current.mask].clone(),
                n_edits=self.n_edits,
                n_scores=len(self.scores),
            )
        )
        if rotate and current is not None:
            self.shards.append(current)
        self.current = fresh
        return fresh

    def finish(self, scores: list[float]) -> None:
        """Count the edit that just trained ``current``, with the final mean activation score of each request."""
        self.current.n_edits += 1
        self.n_edits += 1
        self.scores.extend(scores)

    def merged_into(self, merged: torch.Tensor) -> None:
        """All shards are now part of ``merged``; the next edit starts a new shard."""
        self.merged = merged
        self.shards = []
        self.current = None

    def rollback(self, token: object) -> None:
        """Put the memory back exactly as before edit ``token``; an empty memory removes its hooks."""
        if not self._history or self._history[-1].token is not token:
            raise RuntimeError(
                "WISE edits share one side memory and must be restored newest first (the xke model does so)"
            )
        snapshot = self._history.pop()
        self.merged = snapshot.merged
        self.shards = list(snapshot.shards)
        self.current = snapshot.current
        if self.current is not None:
            self.current.n_edits = snapshot.current_n_edits
            if snapshot.current_values is not None:
                self.current.delta[self.current.mask] = snapshot.current_values
        self.n_edits = snapshot.n_edits
        del self.scores[snapshot.n_scores :]
        self._release_if_empty()

    def abort(self, token: object) -> None:
        """Undo a failed edit ``token``, whether or not it got as far as its snapshot."""
        if self._history and self._history[-1].token is token:
            self.rollback(token)
        else:
            self._release_if_empty()

    def _release_if_empty(self) -> None:
        if not self._history:
            for handle in self._handles:
                handle.remove()
            _MEMORIES.pop(self.module, None)


_MEMORIES: WeakKeyDictionary[torch.nn.Module, SideMemory] = WeakKeyDictionary()


def memory_on(model: torch.nn.Module, module: torch.nn.Module) -> SideMemory:
    """The module's side memory, installing an empty one (and its hooks) if it has none."""
    if module not in _MEMORIES:
        _MEMORIES[module] = SideMemory(model, module)
    return _MEMORIES[module]


def has_memory(module: torch.nn.Module) -> bool:
    return module in _MEMORIES
