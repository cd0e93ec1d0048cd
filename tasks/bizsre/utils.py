"""Bi-ZsRE: records -> edit cases (loader), and per-case scoring (process_results).

Questions of one case, in this order (``Instance.idx``): reliability in the edit language and in the
other language (``src``/``alt``), generality en/zh (``rephrase``/``alt``), locality en/zh asked before
the edit and after it (``loc`` read out along ``loc_ans``; scored post vs pre), portability en/zh
(``portability["New Question"]``/``["New Answer"]``). Under ``edit_mode=sequential`` every post question is
asked once more after the run's last edit and scored as ``<role>_<lang>_<em|f1>_final``.
"""

from __future__ import annotations

import json
from typing import Any

from datasets import Dataset, DatasetDict

from lm_eval_xke.cases import (
    EditCase,
    EditRequest,
    Question,
    metric_suffix,
    task_options_seen,
    wants_final_phase,
    with_final_phase,
)
from lm_eval_xke.data import BIZSRE_TEST, flag_option, load_bizsre, locate
from lm_eval_xke.failed_edits import is_failed_answer
from lm_eval_xke.metrics import F1_FORMULAS, exact_match, normalized_em, normalized_f1, token_f1

LANGS = ("en", "zh")
ROLES = ("reliability", "generality", "locality", "portability")
METRICS = tuple(f"{role}_{lang}_{m}" for role in ROLES for lang in LANGS for m in ("em", "f1"))


def load_dataset(**options: Any) -> DatasetDict:
    """``custom_dataset`` loader. ``options`` is the task metadata merged with the run's model_args.

    Task options: ``xke_edit_lang`` and ``xke_protocol`` (fixed by each task YAML), ``xke_data_file``
    (path to bizsre_test.json, or a folder with the shared-data layout), ``xke_f1`` (harmonic |
    legacy_pr), ``xke_skip_invalid`` (drop malformed records instead of failing; counted in the results).
    """
    edit_lang = options["xke_edit_lang"]
    if edit_lang not in LANGS:
        raise ValueError(f"xke_edit_lang must be one of {', '.join(LANGS)}, got {edit_lang!r}")
    protocol = options["xke_protocol"]
    f1_formula = str(options.get("xke_f1", "harmonic"))
    if f1_formula not in F1_FORMULAS:
        raise ValueError(f"xke_f1 must be one of {', '.join(F1_FORMULAS)}, got {f1_formula!r}")
    path = locate(BIZSRE_TEST, options.get("xke_data_file"))
    data = load_bizsre(path, skip_invalid=flag_option(options, "xke_skip_invalid"))
    source = {
        "file": path.name,
        "sha256": data.sha256,
        "records": len(data.records),
        "skipped_invalid": len(data.skipped),
        "f1": f1_formula,
        "protocol": protocol,
        "task_options": task_options_seen(options),
        "final_phase": wants_final_phase(options),
    }
    docs = [_doc(index, record, edit_lang, protocol, source) for index, record in data.records]
    return DatasetDict({"test": Dataset.from_list(docs)})


def _doc(index: int, record: dict, edit_lang: str, protocol: str, source: dict) -> dict:
    other = "zh" if edit_lang == "en" else "en"
    src = record[edit_lang]
    request = EditRequest(prompt=src["src"], subject=src["subject"], target_new=src["alt"], lang=edit_lang)

    def ask(role: str, lang: str, prompt: str, answer: str, phase: str = "post") -> Question:
        return Question(role=role, lang=lang, prompt=prompt, answers=(answer,), phase=phase, protocol=protocol)

    questions = [
        ask("reliability", edit_lang, src["src"], src["alt"]),
        ask("reliability", other, record[other]["src"], record[other]["alt"]),
        *(ask("generality", lang, record[lang]["rephrase"], record[lang]["alt"]) for lang in LANGS),
        *(ask("locality", lang, record[lang]["loc"], record[lang]["loc_ans"], "pre") for lang in LANGS),
        *(ask("locality", lang, record[lang]["loc"], record[lang]["loc_ans"]) for lang in LANGS),
        *(
            ask(
                "portability",
                lang,
                record[lang]["portability"]["New Question"],
                record[lang]["portability"]["New Answer"],
            )
            for lang in LANGS
        ),
    ]
    if source["final_phase"]:
        questions = with_final_phase(tuple(questions))
    case = EditCase(case_id=f"bizsre-{index}", requests=(request,), questions=tuple(questions), source=source)
    return {"record_index": index, "prompt": src["src"], "target": src["alt"], "xke": case.to_doc()}


def process_results(doc: dict, results: list) -> dict[str, float]:
    """Score one case: ``<role>_<lang>_em`` and ``<role>_<lang>_f1`` for every post-edit question (``_final``
    appended for the re-asked ``final`` ones); locality compares with the answer before the edit."""
    case = EditCase.from_doc(doc["xke"])
    f1_formula = case.source.get("f1", "harmonic")
    pre = {q.lang: r for q, r in zip(case.questions, results, strict=True) if q.phase == "pre"}
    scores: dict[str, float] = {}
    for question, result in zip(case.questions, results, strict=True):
        if question.phase == "pre":
            continue
        reference = pre[question.lang] if question.role == "locality" else None
        em, f1 = _score(question, result, reference, f1_formula)
        scores[f"{question.role}_{question.lang}_em{metric_suffix(question)}"] = em
        scores[f"{question.role}_{question.lang}_f1{metric_suffix(question)}"] = f1
    return scores


def _score(question: Question, result: Any, reference: Any, f1_formula: str) -> tuple[float, float]:
    if is_failed_answer(result):
        return 0.0, 0.0  # the edit failed: a failure on every metric, locality included
    if question.protocol == "teacher_forced":
        answer = _readout(result)
        if reference is None:
            return exact_match(answer["answer"], answer["target"]), token_f1(
                answer["answer_ids"], answer["target_ids"], f1_formula
            )
        before = _readout(reference)
        return exact_match(answer["answer"], before["answer"]), token_f1(
            answer["answer_ids"], before["answer_ids"], f1_formula
        )
    golds = list(question.answers) if reference is None else [reference]
    return normalized_em(result, golds, question.lang), normalized_f1(result, golds, question.lang, f1_formula)


def _readout(result: Any) -> dict:
    """The read-out that `xke` appends to lm-eval's (loglikelihood, is_greedy) pair, as JSON."""
    if not (isinstance(result, (tuple, list)) and len(result) == 3 and isinstance(result[2], str)):
        raise ValueError(
            "Bi-ZsRE teacher-forced tasks need the argmax read-out that only --model xke returns "
            "(use --model xke with editor=none for the unedited baseline)"
        )
    return json.loads(result[2])
