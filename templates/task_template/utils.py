"""Template benchmark: records -> edit cases (``load_dataset``) and per-case scores (``process_results``).

A record is ``{prompt, subject, target, rephrase, loc, loc_ans}`` (see sample.json). Each becomes one lm-eval doc
carrying an :class:`~lm_eval_xke.cases.EditCase`: the edit request, and the ordered questions the `xke` model
asks (``pre`` questions on the unedited model, ``post`` ones after the edit). Metric keys follow the
``<role>_<lang>_<em|f1>`` convention, so `lm-eval-xke leaderboard` and `verify` understand them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from lm_eval_xke.cases import EditCase, EditRequest, Question
from lm_eval_xke.metrics import exact_match, token_f1
from lm_eval_xke.responses import readout_of

DEFAULT_DATA = Path(__file__).with_name("sample.json")


def load_dataset(**options: Any) -> DatasetDict:
    """``custom_dataset`` loader; ``options`` = task metadata + model_args (``xke_data_file`` picks the file)."""
    path = Path(options.get("xke_data_file") or DEFAULT_DATA)
    raw = path.read_bytes()
    source = {
        "file": path.name,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "records": 0,
        "skipped_invalid": 0,
        "f1": str(options.get("xke_f1", "harmonic")),
        "protocol": options["xke_protocol"],
    }
    records = json.loads(raw)
    source["records"] = len(records)
    docs = [_doc(i, r, options["xke_edit_lang"], source) for i, r in enumerate(records)]
    return DatasetDict({"test": Dataset.from_list(docs)})


def _doc(index: int, record: dict, lang: str, source: dict) -> dict:
    def ask(role: str, prompt: str, answer: str, phase: str = "post") -> Question:
        return Question(role=role, lang=lang, prompt=prompt, answers=(answer,), phase=phase)

    questions = (
        ask("reliability", record["prompt"], record["target"]),
        ask("generality", record["rephrase"], record["target"]),
        ask("locality", record["loc"], record["loc_ans"], "pre"),  # the answer before the edit is the gold
        ask("locality", record["loc"], record["loc_ans"]),
    )
    request = EditRequest(prompt=record["prompt"], subject=record["subject"], target_new=record["target"], lang=lang)
    case = EditCase(case_id=f"mybench-{index}", requests=(request,), questions=questions, source=source)
    return {"prompt": record["prompt"], "target": record["target"], "xke": case.to_doc()}


def process_results(doc: dict, results: list) -> dict[str, float]:
    """EM and token F1 of every post-edit question; locality is scored against the pre-edit answer."""
    case = EditCase.from_doc(doc["xke"])
    formula = case.source.get("f1", "harmonic")
    readouts = [readout_of(r) for r in results]  # `xke` appends the argmax read-out to each response
    pre = {q.role: r for q, r in zip(case.questions, readouts, strict=True) if q.phase == "pre"}
    scores = {}
    for q, out in zip(case.questions, readouts, strict=True):
        if q.phase == "post":
            gold = pre.get(q.role) if q.role == "locality" else None
            gold_text, gold_ids = (gold["answer"], gold["answer_ids"]) if gold else (out["target"], out["target_ids"])
            scores[f"{q.role}_{q.lang}_em"] = exact_match(out["answer"], gold_text)
            scores[f"{q.role}_{q.lang}_f1"] = token_f1(out["answer_ids"], gold_ids, formula)
    return scores
