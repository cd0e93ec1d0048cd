"""MEND, Model Editor Networks with gradient Decomposition (Mitchell et al. 2022, arXiv 2110.11309).

A trained editor network turns the rank-one factors of the fine-tuning gradient of an edit into a weight update of
the last MLPs. ``compute.py`` holds the math; :class:`MendTrainable` is the learned part and its training loss
(``lm-eval-xke train mend``); :class:`MendEditor` applies a trained folder (``editor=mend,editor_checkpoint=DIR``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.model_state import evaluating
from lm_eval_xke.editing.teacher_forcing import build_edit_batch, target_log_probs
from lm_eval_xke.editors import AppliedEdit, Editor, HyperParams, WeightDelta, apply_weight_deltas
from lm_eval_xke.editors import edited_module as checked_module
from lm_eval_xke.training import LoadedTrainables, RunningNorm, Trainable, TrainRecord

from .compute import (
    GradientTransform,
    WithWeights,
    gradient_factors,
    is_conv1d,
    locality_kl,
    per_request_nll,
    read_log_probs,
)
from .config import TRAIN_FAMILY_DEFAULTS, MendHyperParams, MendTrainHyperParams


def _key(name: str) -> str:
    return re.sub(r"\W", "_", name)


class MendTrainable(Trainable):
    """The editor networks of one base model: one ``GradientTransform`` per weight shape, the running
    normalisations of ``u`` and ``delta`` per edited module, and one learned edit step size per module."""

    def __init__(self, model, tokenizer, hp: MendTrainHyperParams) -> None:
        super().__init__()
        self._base = (model, tokenizer)  # a tuple, so the frozen base model is not a submodule of the editor
        self.hp = hp
        self.names = hp.module_names(model.config.num_hidden_layers)
        modules = [checked_module(model, name, "MEND") for name in self.names]
        self.transposed = [is_conv1d(m) for m in modules]
        # (in, out) of each module: u is its input, delta the gradient of its output
        shapes = [
            tuple(m.weight.shape) if t else tuple(m.weight.shape)[::-1]
            for m, t in zip(modules, self.transposed, strict=True)
        ]
        self.shape_keys = [f"{i}x{o}" for i, o in shapes]
        self.layer_index = [self.shape_keys[:k].count(key) for k, key in enumerate(self.shape_keys)]
        self.transforms = nn.ModuleDict(
            {
                key: GradientTransform(i, o, hp.rank, hp.n_hidden, self.shape_keys.count(key))
                for key, (i, o) in dict(zip(self.shape_keys, shapes, strict=True)).items()
            }
        )
        self.u_norms = nn.ModuleDict({_key(n): RunningNorm(i) for n, (i, _) in zip(self.names, shapes, strict=True)})
        self.delta_norms = nn.ModuleDict(
            {_key(n): RunningNorm(o) for n, (_, o) in zip(self.names, shapes, strict=True)}
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.names),), hp.edit_lr))

    @property
    def model(self):
        return self._base[0]

    @property
    def tokenizer(self):
        return self._base[1]

    def optimizer_groups(self, hp: MendTrainHyperParams) -> list[dict]:
        others = [p for name, p in self.named_parameters() if name != "edit_lrs"]
        return [{"params": others}, {"params": [self.edit_lrs], "lr": hp.lr_lr}]

    def deltas(self, requests: Sequence[EditRequest]) -> list[WeightDelta]:
        """MEND's update for ``requests``: per module ``-lr * delta~^T u~`` (rank: the tokens edited on)."""
        batch = build_edit_batch(self.tokenizer, requests, self.edit_lrs.device)
        factors = gradient_factors(self.model, self.names, batch)
        deltas = []
        for k, name in enumerate(self.names):
            u, delta = factors[name]
            u_norm, delta_norm = self.u_norms[_key(name)], self.delta_norms[_key(name)]
            if self.training:
                u_norm.update(u)
                delta_norm.update(delta)
            u_new, delta_new = self.transforms[self.shape_keys[k]](u_norm(u), delta_norm(delta), self.layer_index[k])
            step = -self.edit_lrs[k] * delta_new
            # nn.Linear weights are [out, in]: dW = delta~^T u~; Conv1D weights are [in, out]: dW = u~^T delta~
            b, a = (u_new.T, step) if self.transposed[k] else (step.T, u_new)
            deltas.append(WeightDelta(f"{name}.weight", b=b, a=a))
        return deltas

    def edited(self, deltas: Sequence[WeightDelta]) -> WithWeights:
        """The base model with the deltas added, differentiably (the base weights stay untouched)."""
        weights = {}
        for d in deltas:
            param = self.model.get_parameter(d.parameter)
            weights[d.parameter] = (param.detach().float() + d.b @ d.a).to(param.dtype)
        return WithWeights(self.model, weights)

    def loss(self, records: Sequence[TrainRecord]) -> tuple[torch.Tensor, dict[str, float]]:
        """``c_edit * L_edit + c_loc * L_loc``: the NLL of the new answer to the edited question and its paraphrase
        after the edit, and the KL of the unrelated question's answer distribution to the unedited model's."""
        device = self.edit_lrs.device
        post = self.edited(self.deltas([EditRequest(r.src, "", r.alt, r.lang) for r in records]))
        outer = build_edit_batch(
            self.tokenizer, [EditRequest(q, "", r.alt, r.lang) for r in records for q in (r.src, r.rephrase)], device
        )
        edit = per_request_nll(target_log_probs(post, outer, "target_new"), outer.target_mask).mean()
        loc = build_edit_batch(self.tokenizer, [EditRequest(r.loc, "", r.loc_ans, r.lang) for r in records], device)
        with torch.no_grad():
            pre_loc = read_log_probs(self.model, loc)
        kl = locality_kl(pre_loc, read_log_probs(post, loc), loc.target_mask)
        return self.hp.c_edit * edit + self.hp.c_loc * kl, {"edit_nll": edit.item(), "loc_kl": kl.item()}

    @torch.no_grad()
    def validate(self, records: Sequence[TrainRecord]) -> dict[str, float]:
        """Per held-out record, edited alone: teacher-forced argmax hits of src and rephrase (all target tokens right),
        and whether the unrelated question's argmax answer tokens stay those of the unedited model."""
        hits = {"val_edit": 0, "val_rephrase": 0, "val_locality": 0}
        device = self.edit_lrs.device
        for r in records:
            with torch.enable_grad():
                post = self.edited(self.deltas([EditRequest(r.src, "", r.alt, r.lang)]))
            asked = build_edit_batch(
                self.tokenizer, [EditRequest(q, "", r.alt, r.lang) for q in (r.src, r.rephrase)], device
            )
            right = (read_log_probs(post, asked).argmax(-1) == asked.target_ids) | ~asked.target_mask
            hits["val_edit"] += int(right[0].all())
            hits["val_rephrase"] += int(right[1].all())
            loc = build_edit_batch(self.tokenizer, [EditRequest(r.loc, "", r.loc_ans, r.lang)], device)
            same = read_log_probs(self.model, loc).argmax(-1) == read_log_probs(post, loc).argmax(-1)
            hits["val_locality"] += int((same | ~loc.target_mask).all())
        return {k: v / len(records) for k, v in hits.items()}


class MendEditor(Editor):
    """MEND: a trained editor network maps the edit's gradient factors to a low-rank update of the last MLPs."""

    name = "mend"
    replayable = True
    hparams_class = MendHyperParams
    supports_batch = True
    train_hparams_class = MendTrainHyperParams
    train_family_defaults = TRAIN_FAMILY_DEFAULTS

    def __init__(self) -> None:
        self._trained = LoadedTrainables(type(self), "editor")

    @classmethod
    def make_trainable(cls, model, tokenizer, hp: MendTrainHyperParams) -> MendTrainable:
        return MendTrainable(model, tokenizer, hp).to(next(model.parameters()).device)

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """One forward/backward on the requests, their gradient factors through the editor, one weight update."""
        trainable = self.trainable(model, tokenizer, hparams)
        with evaluating(model):
            deltas = [WeightDelta(d.parameter, d.b.detach(), d.a.detach()) for d in trainable.deltas(requests)]
        info = {"method": self.name, "modules": trainable.names, "rank": [d.rank for d in deltas]}
        return apply_weight_deltas(model, deltas, info)

    def prepare(self, model, tokenizer, hparams: HyperParams) -> None:
        """Load the trained editor, which checks that it was trained on these (unedited) weights."""
        self.trainable(model, tokenizer, hparams)

    def trainable(self, model, tokenizer, hparams: HyperParams) -> MendTrainable:
        self.typed_hparams(hparams)
        return self._trained.get(model, tokenizer, hparams.editor_checkpoint)


__all__ = ["MendEditor", "MendHyperParams", "MendTrainHyperParams"]
