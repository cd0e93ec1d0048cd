"""LangEdit (Sun et al. 2025, ACL Findings, arXiv 2506.10800): AlphaEdit for multilingual sequential editing.

Everything but the projection is AlphaEdit's (``AlphaEditEditor``). AlphaEdit projects every update onto one fixed
null space, that of the corpus keys; LangEdit rebuilds it before every call from the corpus second moment blended
with the keys of the edits still in place (every earlier language's, as the authors' code does; ``compute.py``), so
a new language's update is projected off what the earlier languages wrote. The editor keeps, per model, the keys
of each call with the language of each request; restoring an edit drops its call again.
"""

from __future__ import annotations

from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import AppliedEdit, EditorError, HyperParams
from lm_eval_xke.plugins.alphaedit import AlphaEditEditor
from lm_eval_xke.plugins.alphaedit.compute import projected_update
from lm_eval_xke.plugins.memit.compute import compute_ks

from .compute import edited_keys_gram, language_null_space
from .config import FAMILY_DEFAULTS, LangEditHyperParams


class EditStep:
    """The keys one call wrote (``{module: [n, d_in]}``, float64, measured after the edit) and each row's language."""

    def __init__(self, languages: Sequence[str], keys: dict[str, torch.Tensor]) -> None:
        self.languages = tuple(languages)
        self.keys = keys


class LangEditEditor(AlphaEditEditor):
    """AlphaEdit whose null space also excludes the keys of the edits made in earlier calls (languages)."""

    name = "langedit"
    hparams_class = LangEditHyperParams
    family_defaults = FAMILY_DEFAULTS

    def __init__(self) -> None:
        super().__init__()
        self._steps: WeakKeyDictionary = WeakKeyDictionary()  # model -> [EditStep], oldest first
        self._ranks: dict[str, int] = {}  # module -> null-space rank of the call being spread

    def check_hparams(self, model, hparams: HyperParams) -> LangEditHyperParams:
        self.typed_hparams(hparams)
        if not hparams.blend_corpus_count > 0:
            raise EditorError(
                f"blend_corpus_count must be > 0 (the corpus's weight N in the covariance update; LangEdit's code "
                f"uses 100000), got {hparams.blend_corpus_count}"
            )
        if not hparams.blend_edit_count >= 0:
            raise EditorError(
                f"blend_edit_count must be >= 0 (0 keeps AlphaEdit's corpus null space; LangEdit's code uses 100), "
                f"got {hparams.blend_edit_count}"
            )
        return super().check_hparams(model, hparams)

    def key_side(self, model, module: str, keys: torch.Tensor, mom2: torch.Tensor, hp: LangEditHyperParams):
        """AlphaEdit's projected solve, with ``P_t`` from the blended second moment once edits are in place."""
        width = mom2.shape[0]
        empty = torch.zeros(0, width, dtype=torch.float64)
        earlier = [step.keys.get(module, empty) for step in self._steps.get(model, [])]
        if earlier and hp.blend_edit_count > 0:
            projection = language_null_space(
                mom2, earlier, hp.nullspace_threshold, hp.blend_corpus_count, hp.blend_edit_count
            )
            self._ranks[module] = int(torch.trace(projection).round())  # the trace of a projection is its rank
            if self._ranks[module] == 0:
                raise EditorError(
                    f"LangEdit: no eigenvalue of {module}'s key second moment blended with {len(earlier)} earlier "
                    f"edit(s) is below nullspace_threshold={hp.nullspace_threshold}, so every update would be "
                    "projected away; raise the threshold or lower blend_edit_count"
                )
        else:  # the first call (or m = 0): C_0 alone, AlphaEdit's cached projection
            projection = self.projection(model, module, mom2, hp)
            self._ranks[module] = int(torch.trace(projection).round())
        preserved = edited_keys_gram(earlier, width, projection.device)
        return projected_update(keys, projection, preserved, hp.update_l2)

    def spread(self, model, tokenizer, requests, solutions, templates, hp, value_seconds: float) -> AppliedEdit:
        """MEMIT's spread; ``info`` also says which earlier languages the update was projected off."""
        earlier = self._steps.get(model, [])
        languages = sorted({lang for step in earlier for lang in step.languages})
        steps = len(earlier)  # read before this call's own step is remembered
        self._ranks = {}
        edit = super().spread(model, tokenizer, requests, solutions, templates, hp, value_seconds)
        edit.info.update({"earlier_steps": steps, "earlier_languages": languages, "null_space_rank": self._ranks})
        return edit

    def remember(
        self, model, tokenizer, requests: Sequence[EditRequest], templates, hp: LangEditHyperParams
    ) -> AppliedEdit:
        """Keep this call's keys (measured on the edited model, as the code's ``cache_c``) until it is restored.

        The keys replace AlphaEdit's running ``K_p^T K_p``: the blend needs each call's keys apart, and summing the
        steps still in place makes the state after a restore exactly what it was before the edit.
        """
        keys = {
            name: compute_ks(
                model, tokenizer, model.get_submodule(name), requests, templates, hp.template_groups(), hp.fact_token
            ).double()
            for name in hp.module_names()
        }
        step = EditStep([r.lang for r in requests], keys)
        steps = self._steps.setdefault(model, [])
        steps.append(step)

        def forget() -> None:
            # by identity: edits may be restored in any order
            steps[:] = [s for s in steps if s is not step]

        return AppliedEdit(restore=forget)

    def preserved_by_language(self, model, module: str) -> dict[str, torch.Tensor]:
        """``{lang: K_p^T K_p}`` of the edits in place per request language (float64), for inspection and tests."""
        grams: dict[str, torch.Tensor] = {}
        for step in self._steps.get(model, []):
            keys = step.keys.get(module)
            if keys is None:
                continue
            for lang in dict.fromkeys(step.languages):
                rows = keys[[i for i, row_lang in enumerate(step.languages) if row_lang == lang]]
                grams[lang] = grams.get(lang, 0) + rows.T @ rows
        return grams


__all__ = ["LangEditEditor", "LangEditHyperParams"]
