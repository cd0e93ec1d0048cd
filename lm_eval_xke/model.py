"""`xke`: an lm-eval model that edits the wrapped model per edit case before answering.

Requests of docs that carry ``doc["xke"]`` (an :class:`~lm_eval_xke.cases.EditCase`) are grouped per
``(task_name, doc_id)``. Their ``pre`` questions are answered on the unedited model, the editor
plugin is applied, the ``post`` questions are answered, and the model is restored bit-exactly.
Every other request passes through to the backend unedited, so ordinary tasks run under `xke` too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from lm_eval_xke.cases import EditCase
from lm_eval_xke.edit_run import CaseWork, EditOutcome, EditRun
from lm_eval_xke.edit_set import (
    EDIT_SET_MODE_SEMANTICS,
    EditSetSpec,
    HeldSetJournal,
    data_sources,
    edited_fingerprint,
    load_edit_cases,
)
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, EditPlan, hparam_fields
from lm_eval_xke.failed_edits import non_finite_reason
from lm_eval_xke.journal import (
    CaseEntry,
    Journal,
    digest,
    journal_enabled,
    journal_identity,
    journal_path,
)
from lm_eval_xke.model_args import EDIT_MODE_SEMANTICS, SHARDED_SEMANTICS, parse_model_args
from lm_eval_xke.responses import without_readout
from lm_eval_xke.stats import weights_fingerprint

# under lm-eval's logger tree, so that its CLI logging set-up prints our lines next to its own
log = logging.getLogger("lm_eval.models.xke")

#: failed edits listed by name in the results (all of them are counted)
LISTED_FAILURES = 100


class XKELM(LM):
    """Knowledge-editing wrapper registered as `xke`.

    model_args: ``editor`` (registry name, default ``none``), ``preset`` (a named set of the editor's
    hyper-parameters, e.g. ``easyedit``), ``editor_config`` (YAML file of
    hyper-parameters), any hyper-parameter of the chosen editor by name, ``edit_mode``
    (single | batch | sequential), ``edit_order`` (sequential: ``dataset`` or ``interleave`` the tasks' cases),
    ``edit_batch_size``, ``edit_parallel`` (single mode: plan this many cases' edits
    in one batched computation against the unedited model, then apply, answer and restore them one by one; editors
    with ``supports_parallel``), ``backend`` (hf | vllm), ``seed``, ``journal`` (``auto``:
    a resumable journal of finished cases under ``$XKE_CACHE_DIR/journals``; a file or folder; ``off``),
    ``on_edit_failure`` (``skip``: record a failed edit, score its questions 0 and go on; ``stop``: end the run),
    ``edit_set`` (``<task>:<count>[:<offset>]``: edits held for the whole run, so that every ordinary task is
    answered by the edited model; ``edit_set_mode`` batch | sequential, ``edit_set_include_path`` for a user's own
    edit task), ``xke_*`` task options, and every argument of the backend (`hf`: those of lm-eval's HFLM; `vllm`:
    those of HFLM for the editing model plus vLLM's ``EngineArgs`` fields).
    """

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> XKELM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> XKELM:
        """lm-eval's CLI always adds ``batch_size`` and ``device`` (default ``cuda:0``), which lm-eval's own version
        of this method turns into a "got multiple values" TypeError when model_args names them too: here the
        model_args value wins (the CLI cannot tell its defaults from what the user typed)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def __init__(
        self,
        editor: str = "none",
        preset: str | None = None,
        editor_config: str | None = None,
        edit_mode: str = "single",
        edit_order: str = "dataset",
        edit_batch_size: int = 1,
        edit_parallel: int = 1,
        backend: str = "hf",
        seed: int = 0,
        journal: str | bool | None = "auto",
        on_edit_failure: str = "skip",
        edit_set: str | None = None,
        edit_set_mode: str | None = None,
        edit_set_include_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        args = parse_model_args(
            editor=editor,
            edit_mode=edit_mode,
            edit_order=edit_order,
            edit_batch_size=edit_batch_size,
            edit_parallel=edit_parallel,
            backend=backend,
            seed=seed,
            on_edit_failure=on_edit_failure,
            edit_set=edit_set,
            edit_set_mode=edit_set_mode,
            edit_set_include_path=edit_set_include_path,
            kwargs=kwargs,
        )
        self.task_options = args.task_options
        self.backend = args.backend_cls(**args.backend_kwargs)
        if edit_mode == "sequential" and self.world_size > 1:
            raise EditorError(
                f"edit_mode=sequential cannot be sharded over {self.world_size} processes: each process would "
                "accumulate only its own share of the edits. Run it as one process (lm_eval without accelerate "
                "launch), or use edit_mode=single or edit_mode=batch."
            )
        # backends that answer many edits in one call are told, per request, which edits it is answered under
        self.answers_per_edit = getattr(self.backend, "answers_per_edit", False)
        self.editor: Editor = args.editor_cls()
        self.traced: dict[str, dict] = {}  # layers=auto: per hyper-parameter, the causal trace that chose it
        self.hparams = self._resolve_hparams(editor_config, args.overrides, preset)
        self.preset = preset
        self.edit_mode = edit_mode
        self.edit_order = edit_order
        self.edit_batch_size = args.edit_batch_size if edit_mode == "batch" else 1
        self.edit_parallel = args.edit_parallel
        self._plans: dict[tuple[str, int], tuple[EditPlan, float]] = {}  # per case: its plan, its planning seconds
        self.seed = args.seed
        self.journal_setting = journal
        self.on_edit_failure = on_edit_failure
        self._backend_args = args.backend_kwargs
        self._weights = weights_fingerprint(self.backend.model)  # of the unedited model: journal identity, results
        self.run_record = _RunRecord()
        self._held: list[AppliedEdit] = []  # the edit set's edits, applied until the process ends
        self._edit_set: dict[str, Any] | None = None  # what the results record of them
        if args.held is not None:
            self._hold_edit_set(*args.held, include_path=edit_set_include_path)

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
            "preset": self.preset,
            "hparams": self.hparams.to_dict(),
            "edit_mode": self.edit_mode,
            "edit_mode_semantics": EDIT_MODE_SEMANTICS[self.edit_mode]
            + (SHARDED_SEMANTICS.format(n=self.world_size) if self.world_size > 1 else ""),
            "edit_order": self.edit_order,
            "world_size": self.world_size,
            "edit_batch_size": self.edit_batch_size,
            "edit_parallel": self.edit_parallel,
            "backend": self.backend.name,
            **({"backend_settings": self.backend.settings()} if hasattr(self.backend, "settings") else {}),
            "seed": self.seed,
            "on_edit_failure": self.on_edit_failure,
            "weights": self._weights,
            "traced_layers": self.traced or None,
            "task_options": dict(self.task_options),
            "edit_set": self._edit_set,
            # teacher-forced F1 counts token ids of this tokenizer (the evaluated model's own)
            "f1_tokenizer": self.tokenizer_name,
            **self.run_record.summary(),
            "editor_report": self.editor.report(),
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
        if self._edit_set is not None and len(plain) < len(requests):
            tasks = sorted({r.task_name for r in requests if _is_edit_request(r)})
            raise EditorError(
                f"edit_set={self._edit_set['task']}:{self._edit_set['count']} holds its edits for the whole run, and "
                f"the edit tasks {', '.join(tasks)} would edit on top of them: run edit tasks in an lm_eval call "
                "without edit_set, and the ordinary tasks (the side effects of the held edits) in this one"
            )
        if plain:
            answers = self._answer_plain([requests[i] for i in plain], passthrough, answer)
            for i, out in zip(plain, answers, strict=True):
                results[i] = out
        works = self._group_cases(requests)
        if not works:
            return results

        torch.manual_seed(self.seed)
        journal = self._open_journal(requests, works)
        try:
            EditRun(self, requests, works, answer, results, journal).run()
        finally:
            if journal is not None:
                journal.close()
        return results

    def _resolve_hparams(self, editor_config: str | None, overrides: dict[str, Any], preset: str | None):
        """The editor's hyper-parameters for the loaded model; a ``traceable`` one given as ``auto`` (MEMIT's
        ``layers=auto``) becomes as many consecutive blocks as its default has, where the causal trace is largest."""
        config = self.backend.model.config
        model_type, num_layers = getattr(config, "model_type", ""), getattr(config, "num_hidden_layers", None)
        auto = [
            name
            for name, f in hparam_fields(self.editor.hparams_class).items()
            if f.metadata.get("traceable") and str(overrides.get(name, "")).strip().lower() == "auto"
        ]
        if auto:
            from lm_eval_xke.causal_trace import traced_layers

            given = {k: v for k, v in overrides.items() if k not in auto}
            defaults = self.editor.resolve_hparams(model_type, editor_config, given, num_layers, preset)
            for name in auto:
                size = len(getattr(defaults, name))
                self.traced[name] = traced_layers(
                    self.backend.model, self.backend.tokenizer, size, self.task_options.get("xke_data_file")
                )
                overrides = {**overrides, name: self.traced[name]["layers"]}
                log.info("xke %s=auto: the causal trace chose %s", name, self.traced[name]["layers"])
        return self.editor.resolve_hparams(model_type, editor_config, overrides, num_layers, preset)

    def _answer_plain(self, instances: list, passthrough: Callable, answer: Callable) -> list:
        """Ordinary lm-eval requests: the backend's own path (the HF model, edited in place while an edit set is
        held), or, for a backend that answers per edit (vLLM) while an edit set is held, under the held edits."""
        if not (self._held and self.answers_per_edit):
            return passthrough(instances)
        return [without_readout(out) for out in answer(instances, [tuple(self._held)] * len(instances))]

    def _hold_edit_set(self, spec: EditSetSpec, mode: str, include_path: str | None) -> None:
        """Apply the edit set's cases (one call, or one per case on top of the last) and record what was held; with
        a replayable editor, every finished call is journaled and a rerun of a killed run resumes after the last."""
        cases = load_edit_cases(spec, self.task_options, include_path)
        works = [CaseWork(case, key=(spec.task, spec.offset + i)) for i, case in enumerate(cases)]
        chunks = [works] if mode == "batch" else [[work] for work in works]
        model = self.backend.model
        log.info("xke edit_set %s: %d cases, %s, editor %s", spec, len(works), mode, self.editor.name)
        journal = self._open_held_journal(spec, mode, include_path, cases)
        try:
            done = self._resume_held(journal, chunks) if journal is not None else 0
            progress = dict(desc=f"xke edit_set {self.editor.name} {mode}", initial=done, total=len(chunks))
            for chunk in tqdm(chunks[done:], **progress):  # the journaled calls are the leading ones
                outcome = self.apply_edit(chunk)
                if outcome.edit is not None and outcome.edit.rewrites_prompts:
                    outcome.edit.restore()
                    raise EditorError(
                        f"editor '{self.editor.name}' edits the prompt of each question, not the model: it cannot "
                        "hold an edit set for ordinary tasks. Use a weight or memory editor (e.g. memit, rome, grace)."
                    )
                if outcome.edit is not None:
                    self._held.append(outcome.edit)
                if journal is not None:
                    journal.record(chunk, outcome, edited_fingerprint(model, self._held))
        finally:
            if journal is not None:
                journal.close()
        failed = sum(w.key in self.run_record.failures for w in works)
        self._edit_set = {
            "task": spec.task,
            "count": spec.count,
            "offset": spec.offset,
            "include_path": include_path,
            "mode": mode,
            "mode_semantics": EDIT_SET_MODE_SEMANTICS[mode],
            "data": data_sources(cases),
            "cases_sha256": digest([case.to_doc() for case in cases]),
            "n_edits": len(works),
            "n_held": len(works) - failed,
            "n_failed": failed,
            "seconds": round(sum(self.run_record.edit_seconds), 3),
            "weights_edited": edited_fingerprint(model, self._held),
            "resumed_editor_calls": done,
        }

    def _resume_held(self, journal: HeldSetJournal, chunks: list[list[CaseWork]]) -> int:
        """Add back the journaled leading calls of a held set and count them as the run that made them did; how many.
        The editor first does its per-model work on the unedited model, as a whole run did before its first edit."""
        self.editor.prepare(self.backend.model, self.backend.tokenizer, self.hparams)
        done = journal.replay(self.backend.model, chunks)
        for chunk, edit in done:
            for work in chunk:
                self.run_record.note_journaled(work.key, journal.entry(work.key))
            if edit is not None:
                self._held.append(edit)
        return len(done)

    def chunks(self, works: list[CaseWork]) -> list[list[CaseWork]]:
        """The cases of each editor call, in dataset order (one per call outside batch mode)."""
        return [works[i : i + self.edit_batch_size] for i in range(0, len(works), self.edit_batch_size)]

    def apply_edit(self, chunk: list[CaseWork]) -> EditOutcome:
        """One editor call for the chunk's requests. A failed edit is undone and recorded (``on_edit_failure=skip``)
        or ends the run (``stop``); an :class:`EditorError` (a configuration problem) always ends it."""
        model = self.backend.model
        before = weights_fingerprint(model)
        torch.manual_seed(self.seed)  # every call starts from the same RNG state: a resumed run matches a whole one
        plan, planned_seconds = self._plans.pop(chunk[0].key, (None, 0.0))
        started = time.perf_counter() - planned_seconds  # a planned case's share of its group's planning
        try:
            if plan is not None:
                edit = plan()
            else:
                requests = [r for w in chunk for r in w.case.requests]
                edit = self.editor.apply(model, self.backend.tokenizer, requests, self.hparams)
        except EditorError:
            raise
        except Exception as err:
            if weights_fingerprint(model) != before:
                raise EditorError(
                    f"editor '{self.editor.name}' raised {type(err).__name__} and left the model's weights changed; "
                    "an editor must undo its partial changes before raising, so the run cannot go on"
                ) from err
            return self._failed(chunk, time.perf_counter() - started, f"{type(err).__name__}: {err}")
        seconds = time.perf_counter() - started
        reason = non_finite_reason(model, edit)
        if reason is not None:
            edit.restore()
            return self._failed(chunk, seconds, reason)
        self.run_record.edit_seconds.append(seconds)
        return EditOutcome(edit, seconds)

    def plan_ahead(self, works: list[CaseWork], chunk: list[CaseWork], done: dict) -> None:
        """``edit_parallel`` > 1: plan this case's edit with the next pending cases' against the clean model; each
        case's editor call then applies its plan, and the planning time is split evenly over the cases. A planning
        error leaves the cases to their own editor calls, where a failure is handled case by case."""
        if self.edit_parallel == 1 or chunk[0].key in self._plans:
            return
        start = next(i for i, w in enumerate(works) if w is chunk[0])
        group = [w for w in works[start:] if w.key not in done][: self.edit_parallel]
        torch.manual_seed(self.seed)
        started = time.perf_counter()
        try:
            plans = self.editor.plan_parallel(
                self.backend.model, self.backend.tokenizer, [list(w.case.requests) for w in group], self.hparams
            )
        except EditorError:
            raise
        except Exception as err:
            log.warning("xke: planning %d edits together failed (%s); editing them one by one", len(group), err)
            self._plans = {}
            return
        share = (time.perf_counter() - started) / len(group)
        self._plans = {w.key: (plan, share) for w, plan in zip(group, plans, strict=True)}

    def _failed(self, chunk: list[CaseWork], seconds: float, reason: str) -> EditOutcome:
        self.run_record.edit_seconds.append(seconds)
        cases = ", ".join(f"{task} doc {doc_id}" for task, doc_id in (w.key for w in chunk))
        if self.on_edit_failure == "stop":
            raise EditorError(
                f"the edit of {cases} failed ({reason}); on_edit_failure=stop ends the run with the model restored "
                "(finished cases stay in the journal). on_edit_failure=skip records it as a failed edit and goes on."
            )
        log.warning("xke: the edit of %s failed (%s); its questions are scored as failures", cases, reason)
        for work in chunk:
            self.run_record.failures[work.key] = reason
        return EditOutcome(None, seconds, reason)

    # ------------------------------------------------------------ journal

    def _open_journal(self, requests: list, works: list[CaseWork]) -> Journal | None:
        if not journal_enabled(self.journal_setting):
            return None
        settings = {
            **self._journal_settings(),
            "edit_mode": self.edit_mode,
            "edit_order": self.edit_order,
            "edit_batch_size": self.edit_batch_size,
            "edit_parallel": self.edit_parallel,
        }
        request_type = requests[works[0].positions[0]].request_type
        cases = [[*w.key, w.inputs] for w in works]
        return self._journal_at(journal_identity(request_type, type(self.editor), settings, cases))

    def _open_held_journal(
        self, spec: EditSetSpec, mode: str, include_path: str | None, cases: list[EditCase]
    ) -> HeldSetJournal | None:
        """The held edit set's journal, when journaling is on and the editor's edits can be added back."""
        if not journal_enabled(self.journal_setting):
            return None
        if not self.editor.replayable:
            log.info(
                "xke edit_set: editor '%s' keeps state beside the weights, so its held edits are not journaled (a "
                "killed run edits again from the start)",
                self.editor.name,
            )
            return None
        settings = {**self._journal_settings(), "edit_set": str(spec), "edit_set_mode": mode, "include": include_path}
        identity = journal_identity("edit_set", type(self.editor), settings, [c.to_doc() for c in cases])
        return HeldSetJournal(self._journal_at(identity))

    def _journal_settings(self) -> dict[str, Any]:
        """What every journaled edit depends on besides the editor's code and the cases."""
        return {
            "hparams": self.hparams.to_dict(),
            "seed": self.seed,
            "backend": self.backend.name,
            "backend_args": self._backend_args,
            "backend_settings": self.backend.settings() if hasattr(self.backend, "settings") else None,
            "model": str(getattr(self.backend.model.config, "name_or_path", "")),
            "weights": self._weights,
            "task_options": self.task_options,
        }

    def _journal_at(self, identity: dict[str, Any]) -> Journal:
        path = journal_path(self.journal_setting, identity)
        if self.world_size > 1:  # sharded: every process journals its own share of the cases
            path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
        journal = Journal(path, identity)
        self.run_record.journals.add(str(journal.path))
        return journal

    def _group_cases(self, requests: list) -> list[CaseWork]:
        works: dict[tuple[str, int], CaseWork] = {}
        for i, req in enumerate(requests):
            if not _is_edit_request(req):
                continue
            key = (req.task_name, req.doc_id)
            if key not in works:
                works[key] = CaseWork(EditCase.from_doc(req.doc["xke"]), key=key)
                self._check_task_options(req.task_name, works[key].case)
                self._check_final_phase(req.task_name, works[key].case)
                self.run_record.note_case(works[key].case)
            works[key].positions.append(i)
        for work in works.values():
            work.inputs = work.inputs_digest(requests)
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
            if self.edit_mode == "sequential" and task_name not in self.run_record.immediate_only:
                self.run_record.immediate_only.add(task_name)
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
    """What the run saw, for ``results["config"]["xke"]``: data sources, protocols, edit timings, failed edits."""

    sources: dict[str, dict] = field(default_factory=dict)
    protocols: set[str] = field(default_factory=set)
    n_cases: int = 0
    edit_seconds: list[float] = field(default_factory=list)
    immediate_only: set[str] = field(default_factory=set)  # sequential-mode tasks without final questions
    failures: dict[tuple[str, int], str] = field(default_factory=dict)  # (task, doc id) -> why its edit failed
    journals: set[str] = field(default_factory=set)

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

    def note_journaled(self, key: tuple[str, int], entry: CaseEntry) -> None:
        """Count a case answered from the journal as the run that journaled it counted it."""
        if entry.edit.get("seconds") is not None:
            self.edit_seconds.append(float(entry.edit["seconds"]))
        if entry.edit.get("failed"):
            self.failures[key] = str(entry.edit["failed"])

    def summary(self) -> dict:
        n = len(self.edit_seconds)
        failed = sorted(self.failures.items())  # sorted: a resumed run lists them as an uninterrupted one
        return {
            "n_edit_cases": self.n_cases,
            "protocols": sorted(self.protocols),
            "data": list(self.sources.values()),
            "n_editor_calls": n,
            "edit_seconds_total": round(sum(self.edit_seconds), 3),
            "edit_seconds_mean": round(sum(self.edit_seconds) / n, 3) if n else None,
            "n_failed_edits": len(failed),
            "failed_edits": [{"task": t, "doc_id": d, "reason": r} for (t, d), r in failed[:LISTED_FAILURES]],
            "journals": sorted(self.journals),
        }


def _is_edit_request(request) -> bool:
    doc = getattr(request, "doc", None)
    return isinstance(doc, dict) and bool(doc.get("xke"))
