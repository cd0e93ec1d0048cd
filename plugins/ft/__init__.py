"""FT-L and FT-M: constrained fine-tuning of chosen weights towards the new targets.

Zhu et al. 2020, *Modifying Memories in Transformer Models* (arXiv 2012.00363): fine-tune a few weights on the new
facts with an L-infinity bound on the change. FT-L scores the whole target at the prompt's last token (ROME's and
EasyEdit's FT baseline); FT-M masks a teacher-forced loss to the target tokens (EasyEdit; Zhang et al. 2024,
arXiv 2401.01286). The loss and loop live in ``compute.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.model_state import evaluating, frozen_parameters
from lm_eval_xke.editing.teacher_forcing import build_edit_batch
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams

from .compute import clamp_around, edit_loss, make_optimizer, train
from .config import EASYEDIT_PRESET, FAMILY_DEFAULTS, OPTIMIZERS, FtHyperParams


class FtEditor(Editor):
    """Fine-tunes ``module_template.format(layer).weight`` for each layer on all requests at once."""

    hparams_class = FtHyperParams
    family_defaults = FAMILY_DEFAULTS
    presets = {"easyedit": EASYEDIT_PRESET}
    supports_batch = True
    objective: ClassVar[str]

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Train in place; the handle copies the saved weights back (bit-exact)."""
        hp = self.check_hparams(model, hparams)
        names = [f"{m}.weight" for m in hp.module_names()]
        params = {name: model.get_parameter(name) for name in names}
        originals = {name: p.detach().clone() for name, p in params.items()}

        def restore() -> None:
            with torch.no_grad():
                for name, original in originals.items():
                    model.get_parameter(name).copy_(original)

        batch = build_edit_batch(tokenizer, requests, originals[names[0]].device)
        eps = hp.norm_constraint
        try:
            with evaluating(model), frozen_parameters(model):  # no dropout: the fine-tuning is deterministic
                for param in params.values():
                    param.requires_grad_(True)
                result = train(
                    lambda: edit_loss(model, batch, self.objective),
                    make_optimizer(hp.optimizer, params.values(), hp.lr, hp.weight_decay),
                    hp.num_steps,
                    hp.early_stop_loss,
                    after_step=None if eps is None else lambda: clamp_around(params, originals, eps),
                )
        except BaseException:
            restore()
            raise
        with torch.no_grad():
            changes = {name: (params[name] - originals[name]).float() for name in names}
        info = {
            "method": self.name,
            "objective": self.objective,
            "parameters": names,
            "steps": result.steps,
            "initial_loss": result.initial_loss,
            "final_loss": result.final_loss,
            "delta_linf": {n: float(c.abs().max()) for n, c in changes.items()},
            "delta_fro": {n: float(c.norm()) for n, c in changes.items()},
        }
        # The change is dense and full-rank: as a WeightDelta it would need an identity factor (cols x cols, 485 MB
        # for LLaMA-7B's down_proj) and no LoRA-style backend could serve it, so it is undone by copying back.
        return AppliedEdit(restore=restore, info=info)

    def check_hparams(self, model, hparams: HyperParams) -> FtHyperParams:
        """Reject settings that cannot work on this model, naming the fix."""
        self.typed_hparams(hparams)
        if hparams.optimizer not in OPTIMIZERS:
            raise EditorError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {hparams.optimizer!r}")
        if hparams.num_steps < 1:
            raise EditorError(f"num_steps must be >= 1, got {hparams.num_steps}")
        if hparams.lr <= 0:
            raise EditorError(f"lr must be > 0, got {hparams.lr}")
        if hparams.norm_constraint is not None and hparams.norm_constraint <= 0:
            raise EditorError(f"norm_constraint must be > 0 (or none for no clamp), got {hparams.norm_constraint}")
        if not hparams.layers:
            raise EditorError("layers is empty: name at least one block to fine-tune (model_args: layers=20|21)")
        num_layers = model.config.num_hidden_layers
        bad = [layer for layer in hparams.layers if not 0 <= layer < num_layers]
        if bad:
            raise EditorError(f"layers {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        for name in hparams.module_names():
            try:
                model.get_parameter(f"{name}.weight")
            except AttributeError:
                raise EditorError(
                    f"module {name!r} has no weight (model_type {model.config.model_type!r}); set module_template"
                ) from None
        return hparams


class FtLEditor(FtEditor):
    """FT-L: the whole target scored at the prompt's last token (EasyEdit ``objective_optimization: prompt_last``)."""

    name = "ft_l"
    objective = "prompt_last"


class FtMEditor(FtEditor):
    """FT-M: teacher-forced loss masked to the target tokens (EasyEdit ``objective_optimization: target_new``)."""

    name = "ft_m"
    objective = "target_new"


__all__ = ["FtHyperParams", "FtLEditor", "FtMEditor"]
