"""GRACE's discrete key-value adaptor: a codebook on one module, installed as a forward hook.

Every position's module input is compared with the codebook's keys (Euclidean distance, float32). A position
whose nearest key lies within that key's deferral radius gets the key's value as the module output; every other
position keeps the module's own output, bit for bit. The hook exists only while the codebook holds entries, and the
module's parameters are never touched, so an emptied codebook leaves the model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from weakref import WeakKeyDictionary

import torch

#: What writing a key did (the paper's three cases, plus a query already inside a same-label radius).
Write = Literal["added", "expanded", "inside", "split"]
#: The nearest key keeps a radius just below half the distance, so that the new key wins the midpoint (EasyEdit).
SPLIT_MARGIN = 1e-5


@dataclass(eq=False)  # identity semantics: entries are removed by identity, never by value
class Entry:
    key: torch.Tensor  # module input at the edit's last prompt token, float32 [d_in]
    value: torch.Tensor  # module output that replaces it, float32 [d_out]
    epsilon: float  # deferral radius
    label: tuple[int, ...]  # the target's token ids: edits with the same label may share a key


@dataclass
class _Edit:
    """One AppliedEdit's changes to the codebook, as undo steps in the order they were made."""

    token: object
    undo: list[Callable[[], None]] = field(default_factory=list)


class Codebook:
    """The codebook of one module; get it with :func:`codebook_on`, never construct it directly."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.entries: list[Entry] = []
        self._edits: list[_Edit] = []
        self._handle = module.register_forward_hook(self._replace)

    # ------------------------------------------------------------ inference

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to the nearest key and its index, per row of ``queries`` ``[n, d_in]``."""
        keys = torch.stack([e.key for e in self.entries])
        # the exact (non-matmul) distance: a query equal to a key is at distance 0, not at rounding noise
        dists = torch.cdist(queries.float(), keys, compute_mode="donot_use_mm_for_euclid_dist")
        return dists.min(dim=1)

    def _replace(self, _module, args, output):
        if not self.entries:
            return None
        inputs = args[0]
        flat_out = output.reshape(-1, output.shape[-1])
        distance, index = self.nearest(inputs.reshape(-1, inputs.shape[-1]))
        radii = torch.tensor([e.epsilon for e in self.entries], device=distance.device)
        hit = distance <= radii[index]
        if not bool(hit.any()):
            return None
        values = torch.stack([e.value for e in self.entries]).to(flat_out.dtype)
        return torch.where(hit[:, None], values[index], flat_out).view_as(output)

    # ------------------------------------------------------------ writing (GRACE's codebook update)

    def begin(self, token: object) -> None:
        """Open the record of the edit ``token``; every later write is undone by ``rollback(token)``."""
        self._edits.append(_Edit(token))

    def write(self, key: torch.Tensor, label: tuple[int, ...], eps: float, value: torch.Tensor) -> tuple[Entry, Write]:
        """Place an edit's key: the entry whose value is then trained, and which case applied.

        With no key within ``eps`` + its radius, add ``(key, value, eps)``. Otherwise, with the nearest key's
        label, widen its radius to cover the query (``coverage``); with another label, add the key and split
        the two radii at half their distance.
        """
        if self.entries:
            distance, index = (t.item() for t in self.nearest(key[None]))
            nearest = self.entries[int(index)]
            if distance <= eps + nearest.epsilon:
                if nearest.label == label:
                    if distance <= nearest.epsilon:
                        return nearest, "inside"
                    self._set_epsilon(nearest, distance)
                    return nearest, "expanded"
                self._set_epsilon(nearest, distance / 2 - SPLIT_MARGIN)
                return self._add(Entry(key, value, distance / 2, label)), "split"
        return self._add(Entry(key, value, eps, label)), "added"

    def set_value(self, entry: Entry, value: torch.Tensor) -> None:
        old = entry.value
        entry.value = value
        self._edits[-1].undo.append(lambda: setattr(entry, "value", old))

    def _set_epsilon(self, entry: Entry, epsilon: float) -> None:
        old = entry.epsilon
        entry.epsilon = epsilon
        self._edits[-1].undo.append(lambda: setattr(entry, "epsilon", old))

    def _add(self, entry: Entry) -> Entry:
        self.entries.append(entry)
        self._edits[-1].undo.append(lambda: self.entries.remove(entry))
        return entry

    # ------------------------------------------------------------ restoring

    def rollback(self, token: object) -> None:
        """Undo exactly the changes of edit ``token``; an emptied codebook removes its hook."""
        if not self._edits or self._edits[-1].token is not token:
            raise RuntimeError(
                "GRACE edits share one codebook and must be restored newest first (the xke model does so)"
            )
        for step in reversed(self._edits.pop().undo):
            step()
        if not self._edits:
            self._handle.remove()
            _CODEBOOKS.pop(self.module, None)


_CODEBOOKS: WeakKeyDictionary[torch.nn.Module, Codebook] = WeakKeyDictionary()


def codebook_on(module: torch.nn.Module) -> Codebook:
    """The module's codebook, installing an empty one (and its hook) if it has none."""
    if module not in _CODEBOOKS:
        _CODEBOOKS[module] = Codebook(module)
    return _CODEBOOKS[module]


def has_codebook(module: torch.nn.Module) -> bool:
    return module in _CODEBOOKS
