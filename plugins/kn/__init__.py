"""KN, Knowledge Neurons (Dai et al. 2022, arXiv 2104.08696): rewrite the value slots of a fact's neurons.

The math lives in ``compute.py`` (``attribute``, ``coarse_neurons``, ``refine_neurons``, ``slot_updates``); this
module checks the hyper-parameters, builds the attribution prompts and applies the requests' updates together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.model_state import evaluating, frozen_parameters
from lm_eval_xke.editing.templates import context_templates
from lm_eval_xke.editing.tokens import split_prompt_target
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams, apply_weight_deltas, edited_module

from .compute import (
    AttributionPrompt,
    attribute,
    coarse_neurons,
    predicted_token,
    refine_neurons,
    slot_deltas,
    slot_updates,
)
from .config import ATTRIBUTE_TO, FAMILY_DEFAULTS, KnHyperParams


class KnEditor(Editor):
    """Finds each request's knowledge neurons by integrated gradients and rewrites their value slots."""

    name = "kn"
    replayable = True
    hparams_class = KnHyperParams
    family_defaults = FAMILY_DEFAULTS
    # every request is attributed on the model as given and all updates are added in one go, so the requests
    # of several cases can be applied together
    supports_batch = True

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Attribute every request on the unedited model, then add all value-slot updates at once."""
        hp = self.check_hparams(model, hparams)
        layers = hp.layers or list(range(model.config.num_hidden_layers))
        modules = {layer: model.get_submodule(hp.module_template.format(layer)) for layer in layers}
        updates: dict[tuple[int, int], torch.Tensor] = {}
        records = []
        with evaluating(model):
            templates = (
                context_templates(model, tokenizer, [hp.refine_template_length], hp.refine_templates, hp.template_seed)
                if hp.refine
                else ["{}"]
            )
            with frozen_parameters(model), torch.enable_grad():
                for request in requests:
                    start = time.perf_counter()
                    update, record = self.request_update(model, tokenizer, modules, request, templates, hp)
                    for key, change in update.items():
                        updates[key] = updates[key] + change if key in updates else change
                    records.append({**record, "seconds": time.perf_counter() - start})
        info = {"method": self.name, "requests": records}
        return apply_weight_deltas(model, slot_deltas(modules, hp.module_template, updates), info=info)

    def request_update(
        self, model, tokenizer, modules: dict, request: EditRequest, templates: Sequence[str], hp: KnHyperParams
    ) -> tuple[dict[tuple[int, int], torch.Tensor], dict]:
        """The value-slot changes of one request, and what was found on the way."""
        prompt_ids, target_ids = split_prompt_target(tokenizer, request.prompt, request.target_new)
        # the paper's cloze answer is one token: here, the one the model predicts now, whatever the context prefix
        answer = [predicted_token(model, prompt_ids)] if hp.attribute_to == "prediction" else None
        prompts = []
        for template in templates:  # templates[0] is the bare prompt
            ids, target = split_prompt_target(tokenizer, template.format(request.prompt), request.target_new)
            prompts.append(AttributionPrompt.of(ids, answer or target))
        layers = list(modules)
        attributions = [attribute(model, modules, prompt, hp.ig_steps) for prompt in prompts]
        per_prompt = [coarse_neurons(scores, layers, hp.adaptive_threshold) for scores, _ in attributions]
        neurons = refine_neurons(per_prompt, hp.p if hp.refine else 0.0, hp.max_neurons)
        bare = attributions[0][1]
        signs = {
            (n.layer, n.index): 1.0 if bare.activations[layers.index(n.layer)][n.index] >= 0 else -1.0 for n in neurons
        }
        old_token, new_token = bare.predicted, target_ids[0]
        update = slot_updates(model, modules, neurons, signs, old_token, new_token, hp.erase_scale, hp.lr_scale)
        record = {
            "target_new": request.target_new,
            "old_token": tokenizer.decode([old_token]),
            "new_token": tokenizer.decode([new_token]),
            "old_token_id": old_token,
            "new_token_id": new_token,
            "target_tokens": len(target_ids),
            "answer_prob": float(bare.log_prob.exp()),
            "n_coarse": [len(n) for n in per_prompt],
            "neurons": [(n.layer, n.index, round(n.score, 6)) for n in neurons],
        }
        return update, record

    def check_hparams(self, model, hparams: HyperParams) -> KnHyperParams:
        """Reject settings that cannot work on this model, naming the fix."""
        self.typed_hparams(hparams)
        n_layers = model.config.num_hidden_layers
        bad = [layer for layer in hparams.layers if not 0 <= layer < n_layers]
        if bad:
            raise EditorError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        for layer in hparams.layers or [0]:
            edited_module(model, hparams.module_template.format(layer), "KN")
        if hparams.ig_steps < 1:
            raise EditorError(f"ig_steps must be at least 1, got {hparams.ig_steps}")
        if not 0.0 <= hparams.adaptive_threshold < 1.0:
            raise EditorError(f"adaptive_threshold must be in [0, 1), got {hparams.adaptive_threshold}")
        if not 0.0 <= hparams.p < 1.0:
            raise EditorError(f"p must be in [0, 1), got {hparams.p}")
        if hparams.max_neurons < 0:
            raise EditorError(f"max_neurons must be 0 (no cap) or positive, got {hparams.max_neurons}")
        if hparams.attribute_to not in ATTRIBUTE_TO:
            raise EditorError(f"attribute_to must be one of {', '.join(ATTRIBUTE_TO)}, got {hparams.attribute_to!r}")
        if hparams.refine and (hparams.refine_templates < 1 or hparams.refine_template_length < 1):
            raise EditorError("refine needs refine_templates >= 1 and refine_template_length >= 1")
        return hparams


__all__ = ["KnEditor", "KnHyperParams"]
