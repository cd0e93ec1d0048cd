"""The contract between tasks and the `xke` model: edit requests, questions and edit cases.

A task turns each benchmark record into one lm-eval doc whose ``doc["xke"]`` field is
``EditCase.to_doc()``; the model reads it back with ``EditCase.from_doc``. One doc is one
edit case, so lm-eval's ``--limit N`` means N edits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

ROLES = ("reliability", "generality", "locality", "portability")
PHASES = ("pre", "post", "final")
PROTOCOLS = ("teacher_forced", "generate")

#: model_args with this prefix are task options: lm-eval hands model_args to the tasks as metadata
TASK_OPTION_PREFIX = "xke_"
#: options that each task YAML fixes (a model_arg of that name would override the task's own value)
TASK_FIXED_OPTIONS = (
    "xke_edit_lang",
    "xke_protocol",
    "xke_mlake_test_lang",
    "xke_bmike53_dataset",
    "xke_bmike53_lang",
    "xke_user_data",
)

Phase = Literal["pre", "post", "final"]
#: metric-name suffix of questions asked again after the last edit of a sequential run (the forgetting curve)
FINAL_SUFFIX = "_final"
Protocol = Literal["teacher_forced", "generate"]


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model: ``prompt`` + ``target_new``, with ``subject`` inside ``prompt``."""

    prompt: str
    subject: str
    target_new: str
    lang: str

    def __post_init__(self) -> None:
        if self.subject not in self.prompt:
            raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")


@dataclass(frozen=True)
class Question:
    """One question asked of the model for an edit case.

    ``answers`` are the gold strings (the first is the teacher-forcing target). ``phase`` says
    whether it is asked on the unedited model (``pre``), right after the case's own edit (``post``), or,
    in ``edit_mode=sequential``, once more after the run's last edit (``final``).
    """

    role: str
    lang: str
    prompt: str
    answers: tuple[str, ...]
    phase: Phase = "post"
    protocol: Protocol = "teacher_forced"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"question phase must be one of {PHASES}, got {self.phase!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"question protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.answers:
            raise ValueError(f"question {self.prompt!r} has no answers")


@dataclass(frozen=True)
class EditCase:
    """Edit requests applied together, and the ordered questions that measure them.

    ``source`` records where the case came from (data file, its sha256, how many records were
    skipped, the F1 formula): the model reports it in the results JSON.
    """

    case_id: str
    requests: tuple[EditRequest, ...]
    questions: tuple[Question, ...]
    source: dict[str, Any] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        """A plain-dict form that survives a round trip through a `datasets.Dataset`."""
        return {
            "case_id": self.case_id,
            "requests": [asdict(r) for r in self.requests],
            "questions": [{**asdict(q), "answers": list(q.answers)} for q in self.questions],
            "source": dict(self.source),
        }

    @classmethod
    def from_doc(cls, data: dict[str, Any]) -> EditCase:
        return cls(
            case_id=str(data["case_id"]),
            requests=tuple(EditRequest(**r) for r in data["requests"]),
            questions=tuple(Question(**{**q, "answers": tuple(q["answers"])}) for q in data["questions"]),
            source=dict(data.get("source") or {}),
        )


def task_options_seen(options: dict[str, Any]) -> str:
    """The user-settable ``xke_*`` options a task loader received, as JSON for ``EditCase.source["task_options"]``.

    The model compares them with the ``xke_*`` model_args it got: through the Python API with a
    user-made ``TaskManager`` lm-eval does not pass model_args on to the tasks, and an option would
    otherwise be silently ignored.
    """
    seen = {k: options[k] for k in sorted(options) if k.startswith(TASK_OPTION_PREFIX) and k not in TASK_FIXED_OPTIONS}
    # JSON, not a dict: an Arrow struct cannot be empty, and the set of keys varies between runs
    return json.dumps(seen, sort_keys=True, default=str)


def wants_final_phase(options: dict[str, Any]) -> bool:
    """Whether a task loader must add ``final`` questions: the run's model_args say ``edit_mode=sequential``."""
    return str(options.get("edit_mode", "single")) == "sequential"


def with_final_phase(questions: tuple[Question, ...]) -> tuple[Question, ...]:
    """``questions`` plus a ``final`` copy of every ``post`` question, appended in the same order."""
    return questions + tuple(replace(q, phase="final") for q in questions if q.phase == "post")


def metric_suffix(question: Question) -> str:
    return FINAL_SUFFIX if question.phase == "final" else ""
