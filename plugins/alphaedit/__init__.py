"""AlphaEdit (Fang et al. 2025, arXiv 2410.02355): MEMIT with null-space-projected updates, for sequential editing.

Everything but the update's key side is MEMIT's (``MemitEditor``); ``compute.py`` holds the projection and the
projected least squares. Across the calls of a run the editor keeps ``K_p^T K_p`` of the edits made so far, and each
edit's handle takes its share out again when it is restored.
"""

from __future__ import annotations

from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import AppliedEdit, EditorError, HyperParams
from lm_eval_xke.plugins.memit import MemitEditor
from lm_eval_xke.plugins.memit.compute import compute_ks

from .compute import null_space_projection, projected_update
from .config import FAMILY_DEFAULTS, AlphaEditHyperParams


class AlphaEditEditor(MemitEditor):
    """MEMIT whose updates leave the corpus keys' values, and those of earlier edits, unchanged."""

    name = "alphaedit"
    hparams_class = AlphaEditHyperParams
    family_defaults = FAMILY_DEFAULTS
    presets = {}  # MEMIT's EasyEdit preset is not AlphaEdit's (its own lambda and null-space settings)
    replayable = False  # it keeps every edit's keys beside the weights (``remember``)

    def __init__(self) -> None:
        super().__init__()
        self._projections: WeakKeyDictionary = WeakKeyDictionary()
        self._preserved: WeakKeyDictionary = WeakKeyDictionary()  # model -> {module: sum of K_p^T K_p}

    def check_hparams(self, model, hparams: HyperParams) -> AlphaEditHyperParams:
        self.typed_hparams(hparams)
        if hparams.nullspace_threshold <= 0 or hparams.update_l2 < 0:
            raise EditorError("nullspace_threshold must be > 0 and update_l2 >= 0")
        return super().check_hparams(model, hparams)

    def key_side(self, model, module: str, keys: torch.Tensor, mom2: torch.Tensor, hp: AlphaEditHyperParams):
        projection = self.projection(model, module, mom2, hp)
        preserved = self._preserved.setdefault(model, {}).get(module, torch.zeros_like(projection))
        return projected_update(keys, projection, preserved, hp.update_l2)

    def projection(self, model, module: str, mom2: torch.Tensor, hp: AlphaEditHyperParams) -> torch.Tensor:
        key = (module, hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_dtype, hp.nullspace_threshold)
        per_model = self._projections.setdefault(model, {})
        if key not in per_model:
            per_model[key] = null_space_projection(mom2, hp.nullspace_threshold)
            if int(torch.trace(per_model[key]).round()) == 0:  # the trace of a projection is its rank
                raise EditorError(
                    f"AlphaEdit: no eigenvalue of {module}'s key second moment is below nullspace_threshold="
                    f"{hp.nullspace_threshold}, so every update would be projected away; raise the threshold"
                )
        return per_model[key]

    def remember(
        self, model, tokenizer, requests: Sequence[EditRequest], templates, hp: AlphaEditHyperParams
    ) -> AppliedEdit:
        """Add the new keys (measured on the edited model, as the paper's code) to ``K_p^T K_p``; undone on restore."""
        preserved = self._preserved.setdefault(model, {})
        # the handle keeps the keys ([n, d_in]), not their Gram matrix: a [d_in, d_in] float64 per layer and edit is
        # ~94 MB on SmolLM2, which 100 sequential edits turned into ~9 GB; the same product is subtracted on restore
        added = {}
        for name in hp.module_names():
            keys = compute_ks(
                model, tokenizer, model.get_submodule(name), requests, templates, hp.template_groups(), hp.fact_token
            ).double()
            added[name] = keys
            preserved[name] = preserved.get(name, 0) + keys.T @ keys

        def forget() -> None:
            for name, keys in added.items():
                preserved[name] = preserved[name] - keys.T @ keys

        return AppliedEdit(restore=forget)


__all__ = ["AlphaEditEditor", "AlphaEditHyperParams"]
