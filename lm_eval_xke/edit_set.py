"""A held edit set: edits applied before a run answers anything and kept until it ends (model_arg ``edit_set``).

``edit_set=<task>:<count>[:<offset>]`` takes cases ``offset .. offset+count-1`` of one of our edit tasks (Bi-ZsRE,
MLaKE, MzsRE, BMIKE-53 or a user's file, with the run's ``xke_*`` options) and writes their edit requests into the
model with the run's editor: all in one editor call (``edit_set_mode=batch``) or one call per case, each on top of
the last (``sequential``). Every ordinary lm-eval task in ``--tasks`` is then answered by the edited model, which
is how the side effects of those edits on the model's other abilities are measured (``lm-eval-xke side-effects``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lm_eval_xke.cases import EditCase
from lm_eval_xke.data import sha256_of
from lm_eval_xke.editors import AppliedEdit, EditorError, WeightDelta, apply_weight_deltas, restore_all
from lm_eval_xke.journal import FRESH_START, CaseEntry, Journal, JournalError, digest

if TYPE_CHECKING:
    from lm_eval_xke.edit_run import CaseWork, EditOutcome

log = logging.getLogger("lm_eval.models.xke")

#: What each way of applying the held set does, recorded in the results next to the mode itself.
EDIT_SET_MODE_SEMANTICS = {
    "batch": "one editor call with the edit requests of every case of the set",
    "sequential": "one editor call per case in dataset order, each on top of the ones before",
}


@dataclass(frozen=True)
class EditSetSpec:
    """Which cases of which edit task to hold: ``count`` cases from index ``offset`` of the task's docs."""

    task: str
    count: int
    offset: int = 0

    @classmethod
    def parse(cls, value: Any) -> EditSetSpec:
        """``<task>:<count>`` or ``<task>:<count>:<offset>``; an EditorError shows the form on anything else."""
        parts = str(value).split(":")
        usage = (
            f"model_arg edit_set must be <task>:<count>[:<offset>], e.g. edit_set=bizsre_zh:100 (the first 100 "
            f"cases of bizsre_zh) or edit_set=bizsre_zh:100:200 (cases 200-299); got {value!r}"
        )
        if len(parts) not in (2, 3) or not parts[0] or not all(p.isdigit() for p in parts[1:]):
            raise EditorError(usage)
        count, offset = int(parts[1]), int(parts[2]) if len(parts) == 3 else 0
        if count < 1:
            raise EditorError(f"{usage}: the count must be at least 1")
        return cls(parts[0], count, offset)

    def __str__(self) -> str:
        return f"{self.task}:{self.count}:{self.offset}"


def load_edit_cases(spec: EditSetSpec, task_options: dict[str, Any], include_path: str | None = None) -> list[EditCase]:
    """The spec's cases, built by the task itself from its data (the task sees ``task_options`` as metadata).

    Tasks are looked up among lm_eval_xke's task folders and ``include_path`` (a folder of the user's own edit
    tasks, e.g. made from ``templates/multilingual_task``), not among lm-eval's built-in tasks (none is an edit task).
    """
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False, metadata=dict(task_options))
    if spec.task not in manager.all_subtasks:
        raise EditorError(
            f"edit_set names task {spec.task!r}, which is not an edit task of lm_eval_xke (e.g. bizsre_zh, mlake_en, "
            "mzsre_de, bmike53_zsre_fr) nor one in edit_set_include_path: a task of your own needs "
            "edit_set_include_path=<its folder>"
        )
    task = manager.load(spec.task)["tasks"][spec.task]
    docs = task.eval_docs
    if not len(docs) or "xke" not in docs[0]:
        raise EditorError(f"edit_set names task {spec.task!r}, whose docs are not edit cases (no 'xke' field)")
    end = spec.offset + spec.count
    if end > len(docs):
        raise EditorError(
            f"edit_set={spec.task}:{spec.count}:{spec.offset} asks for cases {spec.offset}-{end - 1}, but "
            f"{spec.task} has {len(docs)} cases: lower the count or the offset"
        )
    return [EditCase.from_doc(docs[i]["xke"]) for i in range(spec.offset, end)]


def edited_fingerprint(model, edits: Sequence[AppliedEdit]) -> str:
    """sha256 of the model's sampled weights fingerprint and of every parameter the edits' deltas touched, in full.

    The sampled fingerprint tells checkpoints apart (and sees dense fine-tuning); hashing the touched matrices whole
    tells apart two edit sets that differ in a few rows. Memory editors (GRACE, WISE) keep their edits beside the
    weights: the record's editor, hyper-parameters and data hash say what they hold.
    """
    from lm_eval_xke.stats import weights_fingerprint

    digest = hashlib.sha256(weights_fingerprint(model).encode())
    for name in sorted({delta.parameter for edit in edits for delta in edit.deltas}):
        param = model.get_parameter(name).detach()
        digest.update(name.encode())
        digest.update(param.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_sources(cases: Sequence[EditCase]) -> list[dict[str, Any]]:
    """The data files the cases came from (file, sha256, records, skipped), each once."""
    seen: dict[str, dict[str, Any]] = {}
    for case in cases:
        source = {k: case.source.get(k) for k in ("file", "sha256", "records", "skipped_invalid")}
        seen.setdefault(f"{source['file']}|{source['sha256']}", source)
    return list(seen.values())


class HeldSetJournal:
    """The finished editor calls of a held edit set, so that a run killed while it edits goes on after the last one.

    Each case of a finished call is a line of the run's :class:`~lm_eval_xke.journal.Journal`; the line of a call's
    first case names a file of the call's weight deltas beside the journal (with its sha256) and the fingerprint of
    the edited weights after the call (:func:`edited_fingerprint`). A resumed run adds the journaled deltas back in
    order and checks that fingerprint, so it goes on from the very weights the killed run had, or refuses to.
    Only editors whose edits are wholly their deltas (``Editor.replayable``) are journaled.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.deltas_dir = journal.path.with_suffix(".deltas")

    def replay(self, model, chunks: Sequence[Sequence[CaseWork]]) -> list[tuple[list[CaseWork], AppliedEdit | None]]:
        """Apply the journaled calls, the leading ``chunks`` whose every case is journaled; each with its edit
        (``None``: a failed call, which changed nothing). Raises :class:`JournalError`, with the model restored,
        when a deltas file is missing or altered or the weights come out other than the journal says."""
        replayed: list[tuple[list[CaseWork], AppliedEdit | None]] = []
        last = None
        try:
            for chunk in chunks:
                entries = [self.journal.get(*w.key, case_inputs(w.case)) for w in chunk]
                if any(e is None for e in entries):
                    break
                last = entries[0]
                replayed.append((list(chunk), self._reapply(model, last) if "deltas" in last.edit else None))
            held = [edit for _, edit in replayed if edit is not None]
            if last is not None and edited_fingerprint(model, held) != last.edit["weights_after"]:
                raise JournalError(
                    f"adding back the {len(replayed)} editor call(s) journaled in {self.journal.path} did not give the "
                    f"weights that run had (another torch or device?). {FRESH_START}"
                )
        except BaseException:
            restore_all([edit for _, edit in replayed if edit is not None])
            raise
        if replayed:
            log.info("xke edit_set: %d editor call(s) resumed from %s", len(replayed), self.journal.path)
        return replayed

    def record(self, chunk: Sequence[CaseWork], outcome: EditOutcome, weights_after: str) -> None:
        """Journal one finished call: its deltas file first, then its cases' lines (the commit point)."""
        edit: dict[str, Any] = {"seconds": outcome.seconds, "weights_after": weights_after}
        if outcome.failure is not None:
            edit["failed"] = outcome.failure
        elif outcome.edit is not None:
            name = f"{chunk[0].key[1]}.pt"
            deltas = [{"parameter": d.parameter, "b": d.b, "a": d.a} for d in outcome.edit.deltas]
            from lm_eval_xke.stats import torch_save_atomic

            torch_save_atomic(deltas, self.deltas_dir / name)
            edit |= {"deltas": name, "deltas_sha256": sha256_of(self.deltas_dir / name)}
        others = {"failed": outcome.failure} if outcome.failure is not None else {}
        self.journal.append(
            CaseEntry(*w.key, case_inputs(w.case), [], edit if i == 0 else {"seconds": None, **others})
            for i, w in enumerate(chunk)
        )

    def entry(self, key: tuple[str, int]) -> CaseEntry:
        """The journaled line of a replayed case."""
        return self.journal.entries[key]

    def close(self) -> None:
        self.journal.close()

    def _reapply(self, model, entry: CaseEntry) -> AppliedEdit:
        import torch

        path = self.deltas_dir / entry.edit["deltas"]
        if not path.is_file() or sha256_of(path) != entry.edit["deltas_sha256"]:
            state = "is missing" if not path.is_file() else "was changed after it was written"
            raise JournalError(f"{path}, the weight deltas of a journaled editor call, {state}. {FRESH_START}")
        deltas = [WeightDelta(**d) for d in torch.load(path, map_location="cpu", weights_only=True)]
        return apply_weight_deltas(model, deltas)


def case_inputs(case: EditCase) -> str:
    """What a held case's journal line is checked against: the hash of the case itself."""
    return digest(case.to_doc())
