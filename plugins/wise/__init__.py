"""WISE, a side memory with knowledge sharding and merging (Wang et al. 2024, arXiv 2405.14768).

A side copy of one FFN output projection learns the edits; a router sends a query to it when its activation
score is above the threshold learned in training, else to the untouched main memory (``memory.py``). Edits train
random subspaces (shards) of the side memory, which are TIES-merged every ``merge_freq`` edits (``compute.py``);
one edit's training is in ``train.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hidden_states import padding_id
from lm_eval_xke.editing.model_state import evaluating
from lm_eval_xke.editing.templates import context_templates
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams, edited_module

from .compute import build_edit_batch, merge_weights, module_inputs, random_mask, ties_merge
from .config import FAMILY_DEFAULTS, WiseHyperParams
from .memory import Shard, SideMemory, memory_on
from .train import EditRows, train_shard


class WiseEditor(Editor):
    """Writes each ``apply`` call (one case, or a batch of cases) into the side memory of ``module_template``."""

    name = "wise"
    hparams_class = WiseHyperParams
    family_defaults = FAMILY_DEFAULTS
    # the paper edits batches: all requests of one call train the same shard together, as one edit
    supports_batch = True

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Train the requests into the current shard (merging when due); the handle restores the memory before it."""
        hp = self.check_hparams(model, hparams)
        module = edited_module(model, hp.module_name, "WISE")
        start = time.perf_counter()
        with evaluating(model):  # no dropout while the side memory trains
            rows = self.edit_rows(model, tokenizer, module, requests, hp)
            memory = memory_on(model, module)
            token = object()
            try:
                shard = memory.begin(token, hp.save_freq, lambda: new_shard(module, hp, memory.n_edits))
                result = train_shard(model, module, memory, shard, rows, padding_id(tokenizer), hp)
                memory.act_ratio = hp.act_ratio
                memory.finish(result.edit_scores)
                merged = memory.n_edits % hp.merge_freq == 0
                if merged:
                    merge(memory, hp)
            except BaseException:
                memory.abort(token)
                raise
        info = {
            "method": self.name,
            "module": hp.module_name,
            "targets": [r.target_new for r in requests],
            "nll": result.nll,
            "routing_loss": result.routing_loss,
            "edit_scores": result.edit_scores,
            "irrelevant_score": result.irrelevant_score,
            "threshold": memory.threshold(),
            "steps": result.steps,
            "plain_right": result.plain_right,
            "edits_in_memory": memory.n_edits,
            "merged": merged,
            "seconds": time.perf_counter() - start,
        }
        return AppliedEdit(restore=lambda: memory.rollback(token), info=info)

    def edit_rows(self, model, tokenizer, module, requests: Sequence[EditRequest], hp: WiseHyperParams) -> EditRows:
        templates = context_templates(
            model, tokenizer, hp.context_template_lengths, hp.context_templates_per_length, hp.template_seed
        )
        device = module.weight.device
        pad_id = padding_id(tokenizer)
        irrelevant_inputs, irrelevant_valid = module_inputs(
            model, module, [tokenizer(p)["input_ids"] for p in hp.irrelevant_prompts], pad_id
        )
        return EditRows(
            batch=build_edit_batch(tokenizer, requests, templates, device),
            n_templates=len(templates),
            irrelevant_inputs=irrelevant_inputs,
            irrelevant_valid=irrelevant_valid,
        )

    def check_hparams(self, model, hparams: HyperParams) -> WiseHyperParams:
        """Reject settings that cannot work, naming the fix."""
        self.typed_hparams(hparams)
        checks = [
            (0 < hparams.mask_ratio <= 1, f"mask_ratio must be in (0, 1], got {hparams.mask_ratio}"),
            (0 < hparams.merge_density <= 1, f"merge_density must be in (0, 1], got {hparams.merge_density}"),
            (hparams.n_iter >= 1 and hparams.edit_lr > 0, "n_iter must be >= 1 and edit_lr > 0"),
            (hparams.norm_constraint > 0, f"norm_constraint must be > 0, got {hparams.norm_constraint}"),
            (0 < hparams.act_ratio <= 1, f"act_ratio must be in (0, 1], got {hparams.act_ratio}"),
            (hparams.alpha < hparams.beta, f"alpha ({hparams.alpha}) must be below beta ({hparams.beta})"),
            (hparams.save_freq >= 1, f"save_freq (edits per shard) must be >= 1, got {hparams.save_freq}"),
            (
                hparams.merge_freq >= hparams.save_freq and hparams.merge_freq % hparams.save_freq == 0,
                f"merge_freq ({hparams.merge_freq}) must be a multiple of save_freq ({hparams.save_freq})",
            ),
            (bool(hparams.irrelevant_prompts), "irrelevant_prompts must hold at least one prompt (model_args: 'a|b')"),
        ]
        for ok, message in checks:
            if not ok:
                raise EditorError(message)
        edited_module(model, hparams.module_name, "WISE")
        return hparams


def new_shard(module: torch.nn.Module, hp: WiseHyperParams, edits_before: int) -> Shard:
    """A fresh shard: ``D = 0`` with a new random mask (seeded by ``mask_seed`` and the edits before it)."""
    weight = module.weight
    return Shard(
        delta=torch.zeros(weight.shape, dtype=torch.float32, device=weight.device),
        mask=random_mask(weight.shape, hp.mask_ratio, hp.mask_seed + edits_before, weight.device),
    )


def merge(memory: SideMemory, hp: WiseHyperParams) -> None:
    """TIES-merge every shard (and the previous merged memory) into the side memory; new edits start a new shard."""
    deltas = [s.delta for s in [*memory.shards, memory.current] if s is not None and s.n_edits]
    has_previous = memory.merged is not None
    if has_previous:
        deltas.append(memory.merged)
    memory.merged_into(ties_merge(deltas, merge_weights(len(deltas) - has_previous, has_previous), hp.merge_density))


__all__ = ["WiseEditor", "WiseHyperParams"]
