"""LoRA editing (Hu et al. 2021, arXiv 2106.09685, as an editor in EasyEdit): train low-rank adapters on the targets.

The adapters are trained with ``peft`` on the teacher-forced target loss (FT-M's, ``plugins/ft/compute.py``), then
read back as one rank-r ``WeightDelta`` per adapted module, removed, and merged into the base weights with
``apply_weight_deltas``: the edit is a plain low-rank weight change that restores bit-exactly and that a
LoRA-serving backend can apply as an adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.model_state import evaluating, frozen_parameters
from lm_eval_xke.editing.teacher_forcing import build_edit_batch
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams, apply_weight_deltas
from lm_eval_xke.plugins.ft.compute import edit_loss, make_optimizer, train
from lm_eval_xke.plugins.ft.config import OPTIMIZERS

from .compute import adapter_deltas, attached_adapters, missing_targets, seeded
from .config import FAMILY_DEFAULTS, LoraHyperParams


class LoraEditor(Editor):
    """Trains rank-``rank`` adapters on ``target_modules`` for all requests at once and merges them as deltas."""

    name = "lora"
    replayable = True
    hparams_class = LoraHyperParams
    family_defaults = FAMILY_DEFAULTS
    supports_batch = True

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        hp = self.check_hparams(model, hparams)
        device = next(model.parameters()).device
        batch = build_edit_batch(tokenizer, requests, device)
        # no dropout anywhere: the training is deterministic given init_seed
        with evaluating(model), frozen_parameters(model), seeded(hp.init_seed, device):
            with attached_adapters(model, hp) as params:
                result = train(
                    lambda: edit_loss(model, batch, "target_new"),
                    make_optimizer(hp.optimizer, params, hp.lr, hp.weight_decay),
                    hp.num_steps,
                    hp.early_stop_loss,
                )
                deltas = adapter_deltas(model)
        info = {
            "method": self.name,
            "steps": result.steps,
            "initial_loss": result.initial_loss,
            "final_loss": result.final_loss,
            "modules": len(deltas),
        }
        return apply_weight_deltas(model, deltas, info=info)

    def check_hparams(self, model, hparams: HyperParams) -> LoraHyperParams:
        """Reject settings that cannot work on this model, naming the fix."""
        self.typed_hparams(hparams)
        if hparams.rank < 1:
            raise EditorError(f"rank must be >= 1, got {hparams.rank}")
        if hparams.lora_alpha <= 0:
            raise EditorError(f"lora_alpha must be > 0, got {hparams.lora_alpha}")
        if hparams.num_steps < 1:
            raise EditorError(f"num_steps must be >= 1, got {hparams.num_steps}")
        if hparams.lr <= 0:
            raise EditorError(f"lr must be > 0, got {hparams.lr}")
        if hparams.optimizer not in OPTIMIZERS:
            raise EditorError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {hparams.optimizer!r}")
        if not hparams.target_modules:
            raise EditorError("target_modules is empty; name the modules to adapt, e.g. target_modules=q_proj|v_proj")
        missing = missing_targets(model, hparams.target_modules)
        if missing:
            raise EditorError(
                f"target_modules {missing} match no module of this {model.config.model_type!r} model; "
                "give the last component of linear module names, e.g. q_proj|v_proj (LLaMA) or c_attn (GPT-2)"
            )
        num_layers = model.config.num_hidden_layers
        bad = [layer for layer in hparams.layers if not 0 <= layer < num_layers]
        if bad:
            raise EditorError(f"layers {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        return hparams


__all__ = ["LoraEditor", "LoraHyperParams"]
