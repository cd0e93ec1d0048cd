"""MEMIT, Mass-Editing Memory in a Transformer (Meng et al. 2023, arXiv 2210.07229): many facts, several layers.

The math lives in ``compute.py``; value vectors come from ROME's value optimisation at the last edited layer
(``compute_values``: ``v_batch_size`` requests per batched pass), and the key second moments from the shared
statistics engine (``lm_eval_xke.stats``).
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hooks import device_of
from lm_eval_xke.editing.model_state import evaluating
from lm_eval_xke.editors import (
    AppliedEdit,
    EditorError,
    EditPlan,
    HyperParams,
    apply_weight_deltas,
    combined_edit,
    restore_all,
)
from lm_eval_xke.plugins.rome import RomeEditor
from lm_eval_xke.plugins.rome.compute_v import ValueSolution, compute_values
from lm_eval_xke.stats import CorpusError, key_statistics, module_input_width, parse_corpus

from .compute import compute_ks, layer_delta, least_squares_update, residual_at_fact, spread_residual
from .config import EASYEDIT_PRESET, FAMILY_DEFAULTS, MemitHyperParams


class MemitEditor(RomeEditor):
    """Writes all requests of one call together, spread over ``layers`` (ROME's context templates are reused)."""

    name = "memit"
    hparams_class = MemitHyperParams
    family_defaults = FAMILY_DEFAULTS
    presets = {"easyedit": EASYEDIT_PRESET}
    supports_batch = True

    def __init__(self) -> None:
        super().__init__()
        self._mom2: WeakKeyDictionary = WeakKeyDictionary()

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        hp = self.check_hparams(model, hparams)
        with evaluating(model):
            templates = self.context_templates(model, tokenizer, hp)
            started = time.perf_counter()
            last = model.get_submodule(hp.module_names()[-1])
            solutions = compute_values(model, tokenizer, last, requests, templates, hp)
        return self.spread(model, tokenizer, requests, solutions, templates, hp, time.perf_counter() - started)

    def plan_parallel(
        self, model, tokenizer, cases: Sequence[Sequence[EditRequest]], hparams: HyperParams
    ) -> list[EditPlan]:
        """The values of every case's requests in one batched optimisation (MEMIT computes each case's values on
        the unedited model anyway); a plan spreads its case's values over the layers when applied."""
        hp = self.check_hparams(model, hparams)
        flat = [request for case in cases for request in case]
        with evaluating(model):
            templates = self.context_templates(model, tokenizer, hp)
            started = time.perf_counter()
            last = model.get_submodule(hp.module_names()[-1])
            solutions = compute_values(model, tokenizer, last, flat, templates, hp)
        share = (time.perf_counter() - started) / max(1, len(cases))  # each case's share of the batched work
        bounds = [0, *itertools.accumulate(len(case) for case in cases)]
        return [
            functools.partial(self.spread, model, tokenizer, case, solutions[a:b], templates, hp, share)
            for case, a, b in zip(cases, bounds[:-1], bounds[1:], strict=True)
        ]

    def spread(
        self,
        model,
        tokenizer,
        requests: Sequence[EditRequest],
        solutions: Sequence[ValueSolution],
        templates: Sequence[str],
        hp: MemitHyperParams,
        value_seconds: float,
    ) -> AppliedEdit:
        """Write the requests' values (``solutions``, from the unedited model) over the edited layers, first to last."""
        applied: list[AppliedEdit] = []
        try:
            with evaluating(model):
                mom2 = self.second_moments(model, tokenizer, hp)
                block = model.get_submodule(hp.layer_module_template.format(hp.layers[-1]))
                # z: the residual the last layer must reach; its current value plus the optimised change
                wanted = torch.stack([s.v_star - s.out_plain for s in solutions])
                z = residual_at_fact(model, tokenizer, block, requests, hp.fact_token) + wanted.to(device_of(model))
                layers = []
                for i, name in enumerate(hp.module_names()):
                    module = model.get_submodule(name)
                    keys = compute_ks(
                        model, tokenizer, module, requests, templates, hp.template_groups(), hp.fact_token
                    )
                    targets = z - residual_at_fact(model, tokenizer, block, requests, hp.fact_token)
                    residual = spread_residual(targets, len(hp.layers) - i)
                    key_side = self.key_side(model, name, keys, mom2[name], hp)
                    delta = layer_delta(f"{name}.weight", module, residual, key_side)
                    applied.append(apply_weight_deltas(model, [delta]))
                    layers.append({"module": name, "target_norm": targets.norm(dim=1).mean().item()})
                remaining = z - residual_at_fact(model, tokenizer, block, requests, hp.fact_token)
                applied.append(self.remember(model, tokenizer, requests, templates, hp))
        except BaseException:
            restore_all(applied)
            raise
        info = {
            "method": self.name,
            "layers": layers,
            "value_seconds": value_seconds,
            # how much of the wanted residual change the update did not deliver (0: all of it)
            "residual_left": (remaining.norm(dim=1) / wanted.norm(dim=1).clamp_min(1e-12)).cpu().tolist(),
            "requests": [
                {"subject": r.subject, "nll": s.nll, "plain_right": s.plain_right, "steps": s.steps}
                for r, s in zip(requests, solutions, strict=True)
            ],
        }
        return combined_edit(applied, info)

    def key_side(
        self, model, module: str, keys: torch.Tensor, mom2: torch.Tensor, hp: MemitHyperParams
    ) -> torch.Tensor:
        """``A`` of ``dW = R^T A``: MEMIT's least squares against the corpus keys."""
        return least_squares_update(keys, mom2, hp.update_weight(mom2.shape[0]))

    def remember(self, model, tokenizer, requests, templates, hp: MemitHyperParams) -> AppliedEdit:
        """State kept across calls for later edits (MEMIT keeps none); the handle forgets it again."""
        return AppliedEdit()

    def check_hparams(self, model, hparams: HyperParams) -> MemitHyperParams:
        """Reject settings that cannot work on this model, naming the fix."""
        self.typed_hparams(hparams)
        hparams.check()
        if not hparams.layers or sorted(set(hparams.layers)) != list(hparams.layers):
            raise EditorError(f"layers must be distinct and ascending, e.g. 4|5|6|7|8; got {hparams.layers}")
        n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", "?")
        for name in [*hparams.module_names(), hparams.layer_module_template.format(hparams.layers[-1])]:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise EditorError(
                    f"module {name!r} not found (model_type {model.config.model_type!r}, {n_layers} layers); "
                    "set layers, module_template and layer_module_template"
                ) from None
            if name in hparams.module_names():
                module_input_width(module)  # raises for anything but nn.Linear / Conv1D
        try:
            parse_corpus(hparams.mom2_corpus)
        except CorpusError as err:
            raise EditorError(f"mom2_corpus: {err}") from None
        return hparams

    def prepare(self, model, tokenizer, hparams: HyperParams) -> None:
        """Sample the context templates and load every edited layer's ``C_l``, which later edits reuse."""
        hp = self.check_hparams(model, hparams)
        with evaluating(model):
            self.context_templates(model, tokenizer, hp)
            self.second_moments(model, tokenizer, hp)

    def second_moments(self, model, tokenizer, hp: MemitHyperParams) -> dict[str, torch.Tensor]:
        """``C_l`` of every edited module, from the statistics engine (one pass, disk cache), kept per model."""
        key = (tuple(hp.module_names()), hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_dtype)
        per_model = self._mom2.setdefault(model, {})
        if key not in per_model:
            per_model[key] = key_statistics(
                model, tokenizer, hp.module_names(), hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_dtype, hp.mom2_batch_size
            )
        return per_model[key]


__all__ = ["MemitEditor", "MemitHyperParams"]
