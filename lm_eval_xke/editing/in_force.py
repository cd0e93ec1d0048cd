"""The memory of a prompt editor (IKE, MIKE, SERAC...): per model, its edits in force, oldest first.

Prompt editors change no weight: an edit is a prompt transform plus what the editor keeps with its requests
(retrieved demonstrations, encoded keys). In ``edit_mode=sequential`` several edits are in force at once; the newest
one's transform writes the context of all of them, and the older ones' transforms pass the prompt through while a
newer edit is in force, so each fact appears once. A transform must keep working after ``restore`` (the deferred
vLLM path answers after it), so it reads what was in force when it was applied, not what is in force now.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any
from weakref import WeakKeyDictionary

from lm_eval_xke.cases import EditRequest


class InForce:
    """One applied edit: its requests, what the editor keeps with them, and its place among the edits in force."""

    def __init__(self, requests: Sequence[EditRequest], kept: Any, order: int, edits: list[InForce]) -> None:
        self.requests = list(requests)
        self.kept = kept
        self.order = order
        self._edits = edits  # the live list of the model's edits in force, this one included until withdrawn

    def superseded(self) -> bool:
        """Whether a newer edit of the same editor is in force now (its transform writes this edit's context)."""
        return any(e.order > self.order for e in self._edits)

    def withdraw(self) -> None:
        self._edits[:] = [e for e in self._edits if e is not self]


class EditsInForce:
    """Per model, the edits of one editor instance that are in force, in the order they were applied."""

    def __init__(self) -> None:
        self._per_model: WeakKeyDictionary = WeakKeyDictionary()
        self._applied = itertools.count()

    def add(self, model, requests: Sequence[EditRequest], kept: Any = None) -> list[InForce]:
        """Put an edit in force; returns the edits in force now, oldest first, the new one last."""
        edits = self._per_model.setdefault(model, [])
        edits.append(InForce(requests, kept, next(self._applied), edits))
        return list(edits)

    def of(self, model) -> list[InForce]:
        return list(self._per_model.get(model, []))
