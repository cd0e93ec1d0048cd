"""One ``loglikelihood`` / ``generate_until`` call's edit cases, run: the requests, their results, the journal and
the cases it already holds, and the three ways through them (per chunk from the clean model, deferred to a backend
that answers many edits at once, and sequential). The ``xke`` model (``XKELM``) edits and restores through its
editor; this module decides what is asked when, under which edits, and what is journaled.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from lm_eval_xke.cases import EditCase, Question
from lm_eval_xke.editors import AppliedEdit, restore_all
from lm_eval_xke.failed_edits import failed_answer
from lm_eval_xke.journal import CaseEntry, Journal, JournalError, digest

if TYPE_CHECKING:
    from lm_eval_xke.model import XKELM

log = logging.getLogger("lm_eval.models.xke")


@dataclass
class CaseWork:
    """The requests of one edit case inside one call: positions in the call's request list."""

    case: EditCase
    positions: list[int] = field(default_factory=list)
    key: tuple[str, int] = ("", -1)  # (task name, doc id)
    inputs: str = ""  # hash of the case and its prompts, set once all positions are known

    def positions_in(self, requests: Sequence, phase: str) -> list[int]:
        return [p for p in self.positions if self.case.questions[requests[p].idx].phase == phase]

    def journaled_positions(self, requests: Sequence) -> list[int]:
        """The requests whose answers the journal keeps: all but the ``final`` ones (asked after the last edit)."""
        return [p for p in self.positions if self.case.questions[requests[p].idx].phase != "final"]

    def inputs_digest(self, requests: Sequence) -> str:
        """Hash of everything this case's answers depend on besides the run's settings: the case and the prompts."""
        prompts = [[requests[p].idx, requests[p].args] for p in self.positions]
        return digest({"case": self.case.to_doc(), "requests": prompts})


@dataclass
class EditOutcome:
    """One editor call: the applied edit, or ``None`` and why it failed (the model is then restored)."""

    edit: AppliedEdit | None
    seconds: float
    failure: str | None = None


class EditRun:
    """The edit cases of one call: answered into ``results`` (in the order of ``requests``) through ``answer``."""

    def __init__(
        self,
        lm: XKELM,
        requests: list,
        works: list[CaseWork],
        answer: Callable,
        results: list[Any],
        journal: Journal | None,
    ) -> None:
        self.lm = lm
        self.requests = requests
        self.works = works
        self.answer = answer
        self.results = results
        self.journal = journal
        self.done: dict[tuple[str, int], CaseEntry] = {}  # cases answered from the journal

    def run(self) -> None:
        """The journal's answers first; then the pre questions, the edits and the post (and final) questions."""
        self.done = self.answer_from_journal()
        pre = [p for w in self.works if w.key not in self.done for p in w.positions_in(self.requests, "pre")]
        if self.lm.edit_mode != "sequential" and self.lm.answers_per_edit:
            self.run_deferred(pre)
            return
        self.answer_positions(pre)
        if self.lm.edit_mode == "sequential":
            self.run_sequential(interleaved(self.works) if self.lm.edit_order == "interleave" else self.works)
        else:
            self.run_chunks()

    def run_chunks(self) -> None:
        """single/batch: per chunk, edit the clean model, answer the post questions, restore, journal the cases."""
        for chunk in tqdm(self.lm.chunks(self.works), desc=f"xke {self.lm.editor.name} edits"):
            if all(w.key in self.done for w in chunk):
                continue
            self.lm.plan_ahead(self.works, chunk, self.done)
            outcome = self.lm.apply_edit(chunk)
            post = [p for w in chunk for p in w.positions_in(self.requests, "post")]
            if outcome.edit is None:
                self.fail_positions(post, outcome.failure)
            else:
                try:
                    self.answer_positions(post, [outcome.edit])
                finally:
                    outcome.edit.restore()
            self.record(chunk, outcome)

    def run_deferred(self, pre: list[int]) -> None:
        """The fast path of backends that answer many edits at once (vLLM: one LoRA adapter per edit).

        Every chunk is edited and restored first, its :class:`AppliedEdit` (deltas, prompt transform) kept; then the
        pre questions and every chunk's post questions go to the backend in one call. An edit the backend cannot
        replay after its restore (a memory editor's hooks) has its questions answered while it is applied. The
        journal gets the cases once every answer is in.
        """
        groups: list[tuple[list[int], tuple[AppliedEdit, ...]]] = [(pre, ())]
        finished: list[tuple[list[CaseWork], EditOutcome]] = []
        for chunk in tqdm(self.lm.chunks(self.works), desc=f"xke {self.lm.editor.name} edits"):
            if all(w.key in self.done for w in chunk):
                continue
            self.lm.plan_ahead(self.works, chunk, self.done)
            outcome = self.lm.apply_edit(chunk)
            finished.append((chunk, outcome))
            post = [p for w in chunk for p in w.positions_in(self.requests, "post")]
            if outcome.edit is None:
                self.fail_positions(post, outcome.failure)
                continue
            try:
                if self.lm.backend.can_serve(outcome.edit):
                    groups.append((post, (outcome.edit,)))
                else:
                    self.answer_positions(post, [outcome.edit])
            finally:
                outcome.edit.restore()
        self.answer_groups(groups)
        for chunk, outcome in finished:
            self.record(chunk, outcome)

    def run_sequential(self, works: list[CaseWork]) -> None:
        """Edits accumulate in order; each case is answered right after its own edit, every case again after the
        last edit (``final`` questions: the forgetting curve); all edits are restored at the end, newest first.

        A case finished in the journal is edited again (the later edits build on it) but not asked again; one
        whose edit failed is skipped, as it was. A failed edit's questions, final ones included, score as failures.
        """
        edits: list[AppliedEdit] = []
        failed: dict[tuple[str, int], str] = {}
        try:
            for work in tqdm(works, desc=f"xke {self.lm.editor.name} sequential edits"):
                entry = self.done.get(work.key)
                if entry is not None and entry.edit.get("failed"):
                    self.lm.run_record.note_journaled(work.key, entry)
                    failed[work.key] = entry.edit["failed"]
                    continue
                outcome = self.lm.apply_edit([work])
                post = work.positions_in(self.requests, "post")
                if outcome.edit is None:
                    failed[work.key] = outcome.failure
                    self.fail_positions(post, outcome.failure)
                else:
                    edits.append(outcome.edit)
                    if entry is None:
                        self.answer_positions(post, edits)
                if entry is None:
                    self.record([work], outcome)
            final = [p for w in works if w.key not in failed for p in w.positions_in(self.requests, "final")]
            self.answer_positions(final, edits)
            for work in works:
                if work.key in failed:
                    self.fail_positions(work.positions_in(self.requests, "final"), failed[work.key])
        finally:
            restore_all(edits)

    def answer_from_journal(self) -> dict[tuple[str, int], CaseEntry]:
        """Fill in the answers of journaled cases; the cases done (a batch only when all of its cases are)."""
        journal = self.journal
        if journal is None or not journal.entries:
            return {}
        done: dict[tuple[str, int], CaseEntry] = {}
        for chunk in self.lm.chunks(self.works):
            entries = [journal.get(*w.key, w.inputs) for w in chunk]
            if any(e is None for e in entries):
                continue
            for work, entry in zip(chunk, entries, strict=True):
                positions = work.journaled_positions(self.requests)
                if len(entry.answers) != len(positions):
                    raise JournalError(
                        f"journal {journal.path} holds {len(entry.answers)} answers for {work.key}, this run asks "
                        f"{len(positions)}; delete the file or pass journal=off to start fresh"
                    )
                for p, out in zip(positions, entry.answers, strict=True):
                    self.results[p] = out
                done[work.key] = entry
                if self.lm.edit_mode != "sequential":  # sequential runs edit journaled cases again (and time them)
                    self.lm.run_record.note_journaled(work.key, entry)
        log.info("xke journal %s: %d of %d cases answered from it", journal.path, len(done), len(self.works))
        return done

    def record(self, chunk: list[CaseWork], outcome: EditOutcome) -> None:
        """Append the chunk's cases not yet journaled; the editor call's seconds go with its first case."""
        if self.journal is None:
            return
        self.journal.append(
            CaseEntry(
                task=work.key[0],
                doc_id=work.key[1],
                inputs=work.inputs,
                answers=[self.results[p] for p in work.journaled_positions(self.requests)],
                edit={"seconds": outcome.seconds if i == 0 else None, "failed": outcome.failure},
            )
            for i, work in enumerate(chunk)
            if work.key not in self.journal.finished
        )

    def answer_positions(self, positions: list[int], edits: Sequence[AppliedEdit] = ()) -> None:
        """Answer the requests at ``positions`` in one call; a repeated position (lm-eval repeats/padding) once."""
        self.answer_groups([(positions, tuple(edits))])

    def answer_groups(self, groups: Sequence[tuple[list[int], tuple[AppliedEdit, ...]]]) -> None:
        """Answer every group's positions, each under its edits, in one backend call."""
        positions, instances, under = [], [], []
        for group_positions, edits in groups:
            for p in dict.fromkeys(group_positions):
                instance = self.requests[p]
                for edit in edits:  # prompt editors (IKE) rewrite the prompt; weight editors leave it alone
                    if edit.rewrites_prompts:
                        instance = _with_context(instance, edit.rewrite(instance.args[0], _question(instance)))
                positions.append(p)
                instances.append(instance)
                under.append(edits)
        if not instances:
            return
        answers = self.answer(instances, under) if self.lm.answers_per_edit else self.answer(instances)
        for p, out in zip(positions, answers, strict=True):
            self.results[p] = out

    def fail_positions(self, positions: list[int], reason: str | None) -> None:
        for p in positions:
            self.results[p] = failed_answer(
                self.requests[p].request_type, self.requests[p].args, reason or "failed edit"
            )


def interleaved(works: list[CaseWork]) -> list[CaseWork]:
    """The cases round-robin over their tasks (tasks in first-seen order, each task's cases in dataset order)."""
    per_task: dict[str, list[CaseWork]] = {}
    for work in works:
        per_task.setdefault(work.key[0], []).append(work)
    rounds = itertools.zip_longest(*per_task.values())
    return [work for round_ in rounds for work in round_ if work is not None]


def _question(instance) -> Question:
    """The question an edit-case request asks (lm-eval's ``idx`` numbers the case's questions)."""
    data = instance.doc["xke"]["questions"][instance.idx]
    return Question(**{**data, "answers": tuple(data["answers"])})


def _with_context(instance, context: str):
    """A copy of ``instance`` whose first argument (the prompt) is replaced."""
    clone = copy.copy(instance)
    clone.arguments = (context, *instance.arguments[1:])
    return clone
