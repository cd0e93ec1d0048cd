"""The ``none`` editor: changes nothing, so the "post" answers measure the unedited model (a baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import AppliedEdit, Editor, HyperParams


@dataclass
class NoEditHyperParams(HyperParams):
    """The ``none`` editor takes no hyper-parameters."""


class NoEditor(Editor):
    """Applies no edit; its ``AppliedEdit`` restores nothing."""

    name = "none"
    hparams_class = NoEditHyperParams
    supports_batch = True

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        return AppliedEdit()


__all__ = ["NoEditHyperParams", "NoEditor"]
