"""GRACE, General Retrieval Adaptors for Continual Editing (Hartvigsen et al. 2023, arXiv 2211.11031).

A discrete key-value codebook on one module (``codebook.py``): inputs near a key get the key's trained value as
the module output, every other input passes through unchanged. The math of one edit is in ``compute.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hidden_states import padding_id
from lm_eval_xke.editing.model_state import evaluating
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams, edited_module

from .codebook import codebook_on
from .compute import compute_key, edit_batch, initial_value, train_value
from .config import FAMILY_DEFAULTS, VALUE_INITS, GraceHyperParams


class GraceEditor(Editor):
    """Writes each request as one codebook entry on ``module_template.format(layer)``; restores by removing it."""

    name = "grace"
    hparams_class = GraceHyperParams
    family_defaults = FAMILY_DEFAULTS
    # one key per request: the requests of a batch are written one after another into the same codebook
    supports_batch = True

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Write the requests in order; the returned handle removes exactly their codebook changes."""
        hp = self.check_hparams(model, hparams)
        module = model.get_submodule(hp.module_name)
        codebook = codebook_on(module)
        token = object()
        codebook.begin(token)
        records: list[dict] = []
        try:
            with evaluating(model):  # no dropout while keys are read and values trained
                for request in requests:
                    records.append(self._write(model, tokenizer, module, codebook, request, hp))
        except BaseException:
            codebook.rollback(token)
            raise
        info = {
            "method": self.name,
            "module": hp.module_name,
            "codebook_size": len(codebook.entries),
            "requests": records,
        }
        return AppliedEdit(restore=lambda: codebook.rollback(token), info=info)

    def _write(self, model, tokenizer, module, codebook, request: EditRequest, hp: GraceHyperParams) -> dict:
        start = time.perf_counter()
        batch = edit_batch(tokenizer, request, module.weight.device)
        key, output = compute_key(model, module, batch)
        entry, case = codebook.write(key, tuple(batch.t_ids.tolist()), hp.eps, initial_value(hp, output))
        trained = train_value(model, module, batch, entry, padding_id(tokenizer), hp)
        codebook.set_value(entry, trained.value)
        return {
            "target_new": request.target_new,
            "codebook": case,
            "epsilon": entry.epsilon,
            "nll": trained.nll,
            "first_token_right": trained.first_token_right,
            "value_norm": trained.value.norm().item(),
            "seconds": time.perf_counter() - start,
        }

    def check_hparams(self, model, hparams: HyperParams) -> GraceHyperParams:
        """Reject settings that cannot work on this model, naming the fix."""
        self.typed_hparams(hparams)
        if hparams.val_init not in VALUE_INITS:
            raise EditorError(f"val_init must be one of {', '.join(VALUE_INITS)}, got {hparams.val_init!r}")
        if not hparams.eps > 0:
            raise EditorError(f"eps (the initial deferral radius) must be > 0, got {hparams.eps}")
        if hparams.n_iter < 1 or not hparams.edit_lr > 0:
            raise EditorError(
                f"n_iter must be >= 1 and edit_lr > 0, got n_iter={hparams.n_iter}, edit_lr={hparams.edit_lr}"
            )
        edited_module(model, hparams.module_name, "GRACE")
        return hparams


__all__ = ["GraceEditor", "GraceHyperParams"]
