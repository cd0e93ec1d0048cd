"""MIKE hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import HyperParams

#: ``demo_lang`` value: each question gets the demonstration set of its own language.
QUESTION_LANG = "question"


@dataclass
class MikeHyperParams(HyperParams):
    """Multilingual in-context editing with BMIKE-53's manual demonstrations (Nie et al. 2025); defaults follow
    the authors' final code (8 mixed demonstrations: the first two of each type)."""

    dataset: str = field(
        default="zsre",
        metadata={
            "help": "whose manual demonstrations: zsre | counterfact | wfd (match the task, e.g. counterfact for "
            "bmike53_counterfact_*)"
        },
    )
    shots: int = field(
        default=8,
        metadata={"help": "demonstrations before the new fact; the paper runs 0, 1 and 8"},
    )
    demo_lang: str = field(
        default="en",
        metadata={
            "help": "language of the demonstrations' prompts: en (monolingual English set) or a BMIKE-53 code such "
            "as de or zh (cross-lingual set: English new fact, prompt translated; the paper uses the task's test "
            "language), or question: each question's own language (English questions: the English set)"
        },
    )
    demo_types: list[str] = field(
        default_factory=lambda: ["copy", "update", "retain", "portability"],
        metadata={
            "help": "demonstration types taken in turn (copy|update|retain|portability); one type gives the paper's "
            "metric-specific demonstrations, e.g. portability"
        },
    )
    order_seed: int = field(
        default=0,
        metadata={"help": "seed of the shuffled order of the demonstrations (the authors' code shuffles unseeded)"},
    )
