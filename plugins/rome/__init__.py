"""ROME, Rank-One Model Editing (Meng et al. 2022, arXiv 2202.05262): one rank-one update of one MLP per fact.

The math lives in ``compute.py`` (``compute_k``, ``compute_u``, ``compute_right``) and ``compute_v.py`` (the value
step); this module checks the hyper-parameters, caches per-model work and applies the requests one after another.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.model_state import evaluating
from lm_eval_xke.editing.templates import context_templates, generate_context_templates
from lm_eval_xke.editors import (
    AppliedEdit,
    Editor,
    EditorError,
    EditPlan,
    HyperParams,
    apply_weight_deltas,
    combined_edit,
    edited_module,
    restore_all,
)
from lm_eval_xke.stats import CorpusError, key_statistics, parse_corpus

from .compute import compute_right, compute_u, inverse_second_moment, rank_one_delta
from .compute_v import ValueSolution, compute_values

# bound under another name: ``compute_v`` here would hide the submodule of that name (``rome.compute_v``)
from .compute_v import compute_v as compute_value
from .config import EASYEDIT_VALUE_PRESET, FAMILY_DEFAULTS, RomeHyperParams, ValueHyperParams


class RomeEditor(Editor):
    """Writes each request with one rank-one update of ``module_template.format(layer)``."""

    name = "rome"
    replayable = True
    hparams_class = RomeHyperParams
    family_defaults = FAMILY_DEFAULTS
    presets = {"easyedit": EASYEDIT_VALUE_PRESET}
    supports_batch = False
    batch_unsupported_reason = "ROME writes one fact per rank-one update; use MEMIT to write many facts at once"
    supports_parallel = True

    def __init__(self) -> None:
        # per-model caches, weakly keyed so that a dropped model frees its entries
        self._inv_mom2: WeakKeyDictionary = WeakKeyDictionary()

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Edit the requests in order, each on the model as edited so far; one handle restores them all."""
        hp = self.check_hparams(model, hparams)
        module = model.get_submodule(hp.module_name)
        written: list[tuple[AppliedEdit, dict]] = []
        try:
            with evaluating(model):
                templates = self.context_templates(model, tokenizer, hp)
                inv_mom2 = self.inverse_mom2(model, tokenizer, hp) if hp.mom2_adjustment else None
                for request in requests:
                    started = time.perf_counter()
                    # compute_v's reference pass also yields the key (compute_k's average), saving a forward pass
                    solution = compute_value(model, tokenizer, module, request, templates, hp)
                    written.append(self.write(model, module, request, solution, inv_mom2, hp, started))
        except BaseException:
            restore_all([edit for edit, _ in written])
            raise
        return self.handle(hp, written)

    def prepare(self, model, tokenizer, hparams: HyperParams) -> None:
        """Sample the context templates and load ``C^-1``, which every later edit of this model reuses."""
        hp = self.check_hparams(model, hparams)
        with evaluating(model):
            self.context_templates(model, tokenizer, hp)
            if hp.mom2_adjustment:
                self.inverse_mom2(model, tokenizer, hp)

    def plan_parallel(
        self, model, tokenizer, cases: Sequence[Sequence[EditRequest]], hparams: HyperParams
    ) -> list[EditPlan]:
        """One batched value optimisation for every single-request case; a case of several requests (each written
        on the model as edited by the ones before) is computed when its plan is applied."""
        hp = self.check_hparams(model, hparams)
        module = model.get_submodule(hp.module_name)
        single = [i for i, case in enumerate(cases) if len(case) == 1]
        started = time.perf_counter()
        with evaluating(model):
            templates = self.context_templates(model, tokenizer, hp)
            inv_mom2 = self.inverse_mom2(model, tokenizer, hp) if hp.mom2_adjustment else None
            solutions = compute_values(model, tokenizer, module, [cases[i][0] for i in single], templates, hp)
        share = (time.perf_counter() - started) / max(1, len(single))  # each case's share of the batched work
        planned = dict(zip(single, solutions, strict=True))

        def plan(i: int) -> EditPlan:
            if i not in planned:
                return lambda: self.apply(model, tokenizer, cases[i], hp)
            return lambda: self.handle(
                hp, [self.write(model, module, cases[i][0], planned[i], inv_mom2, hp, time.perf_counter() - share)]
            )

        return [plan(i) for i in range(len(cases))]

    def write(
        self, model, module, request: EditRequest, solution: ValueSolution, inv_mom2, hp: RomeHyperParams, started
    ) -> tuple[AppliedEdit, dict]:
        """Apply the rank-one update that writes ``solution``; its handle and its record (``started``: the clock
        reading when the request's work began)."""
        u = compute_u(solution.k, inv_mom2)
        right = compute_right(u, solution)
        edit = apply_weight_deltas(model, [rank_one_delta(f"{hp.module_name}.weight", module, u, right)])
        record = {
            "subject": request.subject,
            "target_new": request.target_new,
            "nll": solution.nll,
            "plain_right": solution.plain_right,
            "steps": solution.steps,
            "v_init_norm": solution.v_init_norm,
            "delta_norm": solution.delta_norm,
            "update_norm": float(right.norm() * u.norm()),  # ||right ⊗ u||_F
            "seconds": time.perf_counter() - started,
        }
        return edit, record

    def handle(self, hp: RomeHyperParams, written: Sequence[tuple[AppliedEdit, dict]]) -> AppliedEdit:
        """One handle for the written requests (:func:`combined_edit`), with each request's record."""
        return combined_edit(
            [edit for edit, _ in written],
            info={"method": self.name, "module": hp.module_name, "requests": [record for _, record in written]},
        )

    def context_templates(self, model, tokenizer, hp: ValueHyperParams) -> list[str]:
        """The context prefixes: sampled once per model, or per call with ``reuse_context_templates=false``."""
        sample = context_templates if hp.reuse_context_templates else generate_context_templates
        return sample(
            model,
            tokenizer,
            hp.context_template_lengths,
            hp.context_templates_per_length,
            hp.template_seed,
            total_length=hp.context_template_length == "total",
            normalise=hp.context_template_normalise,
        )

    def check_hparams(self, model, hparams: HyperParams) -> RomeHyperParams:
        """Reject settings that cannot work on this model, naming the fix."""
        self.typed_hparams(hparams)
        hparams.check()
        edited_module(model, hparams.module_name, "ROME")
        if hparams.mom2_adjustment:
            try:
                parse_corpus(hparams.mom2_corpus)
            except CorpusError as err:
                raise EditorError(f"mom2_corpus: {err}") from None
        return hparams

    def inverse_mom2(self, model, tokenizer, hp: RomeHyperParams) -> torch.Tensor:
        """``C^-1`` of the edited module's keys; statistics come from the on-disk cache when possible."""
        key = (hp.module_name, hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_dtype)
        per_model = self._inv_mom2.setdefault(model, {})
        if key not in per_model:
            mom2 = key_statistics(
                model, tokenizer, [hp.module_name], hp.mom2_corpus, hp.mom2_n_tokens, hp.mom2_dtype, hp.mom2_batch_size
            )[hp.module_name]
            per_model[key] = inverse_second_moment(mom2).to(model.get_submodule(hp.module_name).weight.device)
        return per_model[key]


__all__ = ["RomeEditor", "RomeHyperParams"]
