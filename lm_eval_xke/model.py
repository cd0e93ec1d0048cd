"""`xke`: an lm-eval model that edits the wrapped model per edit case before answering.

Requests of docs that carry ``doc["xke"]`` (an :class:`~lm_eval_xke.cases.EditCase`) are grouped per
``(task_name, doc_id)``. Their ``pre`` questions are answered on the unedited model, the editor
plugin is applied, the ``post`` questions are answered, and the model is restored bit-exactly.
Every other request passes through to the backend unedited, so ordinary tasks run under `xke` too.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from lm_eval_xke.cases import TASK_FIXED_OPTIONS, TASK_OPTION_PREFIX, EditCase
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, get_editor, hparam_fields

# under lm-eval's logger tree, so that its CLI logging set-up prints our lines next to its own
log = logging.getLogger("lm_eval.models.xke")

#: What each edit mode does, recorded in the results ``config`` next to the mode itself.
EDIT_MODE_SEMANTICS = {
    "single": "per case: edit from the clean model, answer its questions, restore",
    "batch": "per chunk of edit_batch_size cases: one editor call for all their requests, answer them all, restore",
    "sequential": (
        "edits accumulate in dataset order; each case is answered right after its own edit (the plain metrics) and "
        "all cases again after the last edit (metrics suffixed _final); restored at the end"
    ),
}
EDIT_MODES = tuple(EDIT_MODE_SEMANTICS)
#: Appended to the semantics of a run sharded by ``accelerate launch`` (lm-eval gives process r every n-th doc).
SHARDED_SEMANTICS = (
    "; sharded over {n} processes: each edits and answers one case in {n} (doc ids equal to its rank modulo {n}), "
    "so batches form within a process's share; n_edit_cases, n_editor_calls and edit timings are process 0's"
)
BACKENDS = ("hf", "vllm")


@dataclass
class _CaseWork:
    """The requests of one edit case inside one call: positions in the call's request list."""

    case: EditCase
    positions: list[int] = field(default_factory=list)

    def positions_in(self, requests: Sequence, phase: str) -> list[int]:
        return [p for p in self.positions if self.case.questions[requests[p].idx].phase == phase]


class XKELM(LM):
    """Knowledge-editing wrapper registered as `xke`.

    model_args: ``editor`` (registry name, default ``none``), ``editor_config`` (YAML file of
    hyper-parameters), any hyper-parameter of the chosen editor by name, ``edit_mode``
    (single | batch | sequential), ``edit_batch_size``, ``backend`` (hf | vllm), ``seed``, ``xke_*`` task
    options, and every argument of the backend (`hf`: those of lm-eval's HFLM; `vllm`: those of HFLM for the
    editing model plus vLLM's ``EngineArgs`` fields).
    """

    def __init__(
        self,
        editor: str = "none",
        editor_config: str | None = None,
        edit_mode: str = "single",
        edit_batch_size: int = 1,
        backend: str = "hf",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        editor = "none" if editor is None else str(editor)  # lm-eval parses the model_arg `none` to None
        if edit_mode not in EDIT_MODES:
            raise EditorError(f"edit_mode must be one of {', '.join(EDIT_MODES)}, got {edit_mode!r}")
        if backend not in BACKENDS:
            raise EditorError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        editor_cls = get_editor(editor)
        if edit_mode == "batch" and not editor_cls.supports_batch:
            raise EditorError(
                f"editor '{editor}' cannot edit in batch mode: {editor_cls.batch_unsupported_reason}. "
                "Use edit_mode=single or edit_mode=sequential."
            )
        edit_batch_size = _int_arg("edit_batch_size", edit_batch_size, minimum=1)
        seed = _int_arg("seed", seed, minimum=0)
        backend_cls = _backend_class(backend)
        overrides, self.task_options, backend_kwargs = _split_model_args(kwargs, editor_cls, backend_cls)
        self.backend = backend_cls(**backend_kwargs)
        if edit_mode == "sequential" and self.world_size > 1:
            raise EditorError(
                f"edit_mode=sequential cannot be sharded over {self.world_size} processes: each process would "
                "accumulate only its own share of the edits. Run it as one process (lm_eval without accelerate "
                "launch), or use edit_mode=single or edit_mode=batch."
            )
        # backends that answer many edits in one call are told, per request, which edits it is answered under
        self._answers_per_edit = getattr(self.backend, "answers_per_edit", False)
        self.editor: Editor = editor_cls()
        model_type = getattr(self.backend.model.config, "model_type", "")
        self.hparams = self.editor.resolve_hparams(model_type, editor_config, overrides)
        self.edit_mode = edit_mode
        self.edit_batch_size = edit_batch_size if edit_mode == "batch" else 1
        self.seed = seed
        self._run = _RunRecord()

    # ------------------------------------------------------------ lm-eval plumbing, forwarded

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    @property
    def tokenizer_name(self) -> str:
        return self.backend.lm.tokenizer_name

    @property
    def eot_token_id(self):
        return self.backend.lm.eot_token_id

    @property
    def max_length(self) -> int:
        return self.backend.lm.max_length

    @property
    def device(self):
        return self.backend.lm.device

    @property
    def accelerator(self):
        """HFLM's ``accelerate.Accelerator`` when launched as several processes (``accelerate launch``), else None."""
        return getattr(self.backend.lm, "accelerator", None)

    # HFLM shards docs only over several GPUs: on CPU (gloo) it leaves every process at rank 0 of 1, so each would
    # evaluate everything. The accelerator knows the real process group: rank, size and gathers come from it.
    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else self.backend.lm.rank

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator else self.backend.lm.world_size

    @property
    def batch_sizes(self):
        return self.backend.lm.batch_sizes

    def all_gather(self, tensor):
        return self.accelerator.gather(tensor) if self.world_size > 1 else tensor

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.backend.lm.chat_template(chat_template)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.backend.lm.apply_chat_template(chat_history, add_generation_prompt)

    def set_cache_hook(self, cache_hook) -> None:
        if getattr(cache_hook, "dbdict", None) is not None:
            raise ValueError(
                "--use_cache cannot be used with --model xke: lm-eval's response cache is keyed on the prompt only, "
                "so it would return answers of the unedited (or differently edited) model. Drop --use_cache."
            )
        super().set_cache_hook(cache_hook)

    def get_model_info(self) -> dict:
        info = self.backend.lm.get_model_info()
        info["xke"] = {
            "editor": self.editor.name,
            "hparams": self.hparams.to_dict(),
            "edit_mode": self.edit_mode,
            "edit_mode_semantics": EDIT_MODE_SEMANTICS[self.edit_mode]
            + (SHARDED_SEMANTICS.format(n=self.world_size) if self.world_size > 1 else ""),
            "world_size": self.world_size,
            "edit_batch_size": self.edit_batch_size,
            "backend": self.backend.name,
            **({"backend_settings": self.backend.settings()} if hasattr(self.backend, "settings") else {}),
            "seed": self.seed,
            "task_options": dict(self.task_options),
            # teacher-forced F1 counts token ids of this tokenizer (the evaluated model's own)
            "f1_tokenizer": self.tokenizer_name,
            **self._run.summary(),
        }
        return info

    # ------------------------------------------------------------ requests

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._answer_all(requests, self.backend.lm.loglikelihood, self._readout)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._answer_all(requests, self.backend.lm.generate_until, self.backend.generate)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if any(_is_edit_request(r) for r in requests):
            raise ValueError("xke edit cases cannot be scored with loglikelihood_rolling")
        return self.backend.lm.loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _readout(self, instances: Sequence, *under: Sequence[tuple[AppliedEdit, ...]]) -> list:
        return [r.as_response() for r in self.backend.readout([inst.args for inst in instances], *under)]

    def _answer_all(self, requests: list, passthrough: Callable, answer: Callable) -> list:
        """Answer every request, editing per case; results keep the order of ``requests``."""
        results: list[Any] = [None] * len(requests)
        plain = [i for i, r in enumerate(requests) if not _is_edit_request(r)]
        if plain:
            for i, out in zip(plain, passthrough([requests[i] for i in plain]), strict=True):
                results[i] = out
        works = self._group_cases(requests)
        if not works:
            return results

        torch.manual_seed(self.seed)
        pre = [p for w in works for p in w.positions_in(requests, "pre")]
        if self.edit_mode != "sequential" and self._answers_per_edit:
            self._run_deferred(requests, works, pre, answer, results)
            return results
        self._answer_positions(requests, pre, answer, results)
        if self.edit_mode == "sequential":
            self._run_sequential(requests, works, answer, results)
        else:
            for chunk_start in tqdm(range(0, len(works), self.edit_batch_size), desc=f"xke {self.editor.name} edits"):
                chunk = works[chunk_start : chunk_start + self.edit_batch_size]
                edit = self._apply([r for w in chunk for r in w.case.requests])
                try:
                    post = [p for w in chunk for p in w.positions_in(requests, "post")]
                    self._answer_positions(requests, post, answer, results, [edit])
                finally:
                    edit.restore()
        return results

    def _run_deferred(self, requests: list, works: list[_CaseWork], pre: list[int], answer: Callable, results: list):
        """The fast path of backends that answer many edits at once (vLLM: one LoRA adapter per edit).

        Every chunk is edited and restored first, its :class:`AppliedEdit` (deltas, prompt transform) kept; then the
        pre questions and every chunk's post questions go to the backend in one call. An edit the backend cannot
        replay after its restore (a memory editor's hooks) has its questions answered while it is applied.
        """
        groups: list[tuple[list[int], tuple[AppliedEdit, ...]]] = [(pre, ())]
        for chunk_start in tqdm(range(0, len(works), self.edit_batch_size), desc=f"xke {self.editor.name} edits"):
            chunk = works[chunk_start : chunk_start + self.edit_batch_size]
            edit = self._apply([r for w in chunk for r in w.case.requests])
            try:
                post = [p for w in chunk for p in w.positions_in(requests, "post")]
                if self.backend.can_serve(edit):
                    groups.append((post, (edit,)))
                else:
                    self._answer_positions(requests, post, answer, results, [edit])
            finally:
                edit.restore()
        self._answer_groups(requests, groups, answer, results)

    def _run_sequential(self, requests: list, works: list[_CaseWork], answer: Callable, results: list) -> None:
        """Edits accumulate in order; each case is answered right after its own edit, every case again after the
        last edit (``final`` questions: the forgetting curve); all edits are restored at the end, newest first."""
        edits: list[AppliedEdit] = []
        try:
            for work in tqdm(works, desc=f"xke {self.editor.name} sequential edits"):
                edits.append(self._apply(list(work.case.requests)))
                self._answer_positions(requests, work.positions_in(requests, "post"), answer, results, edits)
            final = [p for w in works for p in w.positions_in(requests, "final")]
            self._answer_positions(requests, final, answer, results, edits)
        finally:
            for edit in reversed(edits):
                edit.restore()

    def _apply(self, edit_requests: list) -> AppliedEdit:
        started = time.perf_counter()
        edit = self.editor.apply(self.backend.model, self.backend.tokenizer, edit_requests, self.hparams)
        self._run.edit_seconds.append(time.perf_counter() - started)
        return edit

    def _answer_positions(
        self, requests: list, positions: list[int], answer: Callable, results: list, edits: Sequence[AppliedEdit] = ()
    ) -> None:
        """Answer the requests at ``positions`` in one call; a repeated position (lm-eval repeats/padding) once."""
        self._answer_groups(requests, [(positions, tuple(edits))], answer, results)

    def _answer_groups(
        self, requests: list, groups: Sequence[tuple[list[int], tuple[AppliedEdit, ...]]], answer: Callable, results
    ) -> None:
        """Answer every group's positions, each under its edits, in one backend call."""
        positions, instances, under = [], [], []
        for group_positions, edits in groups:
            for p in dict.fromkeys(group_positions):
                instance = requests[p]
                for edit in edits:  # prompt editors (IKE) rewrite the prompt; weight editors leave it alone
                    if edit.prompt_transform is not None:
                        instance = _with_context(instance, edit.prompt_transform(instance.args[0]))
                positions.append(p)
                instances.append(instance)
                under.append(edits)
        if not instances:
            return
        answers = answer(instances, under) if self._answers_per_edit else answer(instances)
        for p, out in zip(positions, answers, strict=True):
            results[p] = out

    def _group_cases(self, requests: list) -> list[_CaseWork]:
        works: dict[tuple[str, int], _CaseWork] = {}
        for i, req in enumerate(requests):
            if not _is_edit_request(req):
                continue
            key = (req.task_name, req.doc_id)
            if key not in works:
                works[key] = _CaseWork(EditCase.from_doc(req.doc["xke"]))
                self._check_task_options(req.task_name, works[key].case)
                self._check_final_phase(req.task_name, works[key].case)
                self._run.note_case(works[key].case)
            works[key].positions.append(i)
        return list(works.values())

    def _check_task_options(self, task_name: str, case: EditCase) -> None:
        if "task_options" not in case.source:
            return  # a task that does not record its options
        seen = json.loads(case.source["task_options"])
        missed = {k: v for k, v in self.task_options.items() if seen.get(k) != v}
        if missed:
            raise EditorError(
                f"task {task_name} was built without the model_args {missed} (it saw {seen or 'none'}). lm-eval passes "
                "model_args to the tasks only when it builds the TaskManager itself: with lm_eval.simple_evaluate, "
                "omit task_manager or create it as TaskManager(metadata=<the same model_args as a dict>)."
            )

    def _check_final_phase(self, task_name: str, case: EditCase) -> None:
        """Tasks add ``final`` questions exactly when they saw ``edit_mode=sequential`` among the model_args."""
        built_for = case.source.get("final_phase")
        if built_for is None:
            if self.edit_mode == "sequential" and task_name not in self._run.immediate_only:
                self._run.immediate_only.add(task_name)
                log.warning(
                    "task %s is scored right after each edit only: it asks nothing after the last edit", task_name
                )
            return
        if bool(built_for) != (self.edit_mode == "sequential"):
            raise EditorError(
                f"task {task_name} was built for edit_mode={'sequential' if built_for else 'single/batch'} but the "
                f"model runs edit_mode={self.edit_mode}. lm-eval passes model_args to the tasks only when it builds "
                "the TaskManager itself: with lm_eval.simple_evaluate, omit task_manager or create it as "
                "TaskManager(metadata=<the same model_args as a dict>)."
            )


@dataclass
class _RunRecord:
    """What the run saw, for ``results["config"]["xke"]``: data sources, protocols, edit timings."""

    sources: dict[str, dict] = field(default_factory=dict)
    protocols: set[str] = field(default_factory=set)
    n_cases: int = 0
    edit_seconds: list[float] = field(default_factory=list)
    immediate_only: set[str] = field(default_factory=set)  # sequential-mode tasks without final questions

    def note_case(self, case: EditCase) -> None:
        self.n_cases += 1
        self.protocols.update(q.protocol for q in case.questions)
        key = "|".join(str(case.source.get(k)) for k in ("file", "sha256", "protocol", "f1"))
        if case.source.get("file") and key not in self.sources:
            self.sources[key] = dict(case.source)
            log.info(
                "xke scoring: data %(file)s (sha256 %(sha256)s, %(records)s records, %(skipped_invalid)s skipped), "
                "protocol %(protocol)s, F1 formula %(f1)s",
                {k: case.source.get(k) for k in ("file", "sha256", "records", "skipped_invalid", "protocol", "f1")},
            )

    def summary(self) -> dict:
        n = len(self.edit_seconds)
        return {
            "n_edit_cases": self.n_cases,
            "protocols": sorted(self.protocols),
            "data": list(self.sources.values()),
            "n_editor_calls": n,
            "edit_seconds_total": round(sum(self.edit_seconds), 3),
            "edit_seconds_mean": round(sum(self.edit_seconds) / n, 3) if n else None,
        }


def _is_edit_request(request) -> bool:
    doc = getattr(request, "doc", None)
    return isinstance(doc, dict) and bool(doc.get("xke"))


def _with_context(instance, context: str):
    """A copy of ``instance`` whose first argument (the prompt) is replaced."""
    clone = copy.copy(instance)
    clone.arguments = (context, *instance.arguments[1:])
    return clone


def _int_arg(name: str, value: Any, minimum: int) -> int:
    """A whole-number model_arg (lm-eval turns "5" into 5 but passes "abc" on); an EditorError names it."""
    try:
        number = int(value)
        whole = not isinstance(value, bool) and number == float(value)
    except (TypeError, ValueError):
        whole = False
    if not whole or number < minimum:
        raise EditorError(f"model_arg {name} must be a whole number >= {minimum}, got {value!r}")
    return number


def _backend_class(name: str) -> type:
    """The backend's class; `vllm` (an optional extra) is imported only when asked for."""
    if name == "vllm":
        from lm_eval_xke.backends.vllm import VLLMBackend

        return VLLMBackend
    from lm_eval_xke.backends.hf import HFBackend

    return HFBackend


def _split_model_args(kwargs: dict[str, Any], editor_cls: type[Editor], backend_cls: type) -> tuple[dict, dict, dict]:
    """Split model_args into editor hyper-parameter overrides, ``xke_*`` task options and backend arguments."""
    hparam_names = set(hparam_fields(editor_cls.hparams_class))
    hf_names = set(inspect.signature(HFLM.__init__).parameters) - {"self", "backend", "kwargs"}
    engine_names = set(getattr(backend_cls, "engine_argument_names", frozenset)())  # `vllm`: EngineArgs fields
    backend_names = hf_names | engine_names
    overrides, task_options, backend_kwargs, unknown = {}, {}, {}, []
    for key, value in kwargs.items():
        if key in TASK_FIXED_OPTIONS:
            raise EditorError(f"model_arg '{key}' is fixed by each task (choose the task, e.g. bizsre_zh, instead)")
        if key.startswith(TASK_OPTION_PREFIX):
            task_options[key] = value
        elif key in hparam_names:
            overrides[key] = value
        elif key in backend_names:
            backend_kwargs[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise EditorError(
            f"unknown model_args for --model xke: {', '.join(sorted(unknown))}. "
            f"xke arguments: editor, editor_config, edit_mode, edit_batch_size, backend, seed, xke_* task options; "
            f"hyper-parameters of editor '{editor_cls.name}': {', '.join(sorted(hparam_names)) or '(none)'}; "
            f"backend ({backend_cls.name}) arguments: {', '.join(sorted(hf_names))}"
            + (" and vLLM's EngineArgs fields" if engine_names else "")
        )
    if "pretrained" not in backend_kwargs:
        raise EditorError("--model xke needs pretrained=<model name, local folder or PreTrainedModel>")
    return overrides, task_options, backend_kwargs
