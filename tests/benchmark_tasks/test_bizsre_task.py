"""Bi-ZsRE task: records -> edit cases, and scoring against hand-computed values."""

from __future__ import annotations

import json

import pytest

from lm_eval_xke.cases import EditCase
from lm_eval_xke.tasks.bizsre.utils import METRICS, load_dataset, process_results


def readout(answer: str, target: str, answer_ids: list[int], target_ids: list[int]) -> tuple:
    details = {"answer": answer, "target": target, "answer_ids": answer_ids, "target_ids": target_ids}
    return (-1.0, answer == target, json.dumps(details))


@pytest.fixture(scope="module")
def zh_docs(data_dir):
    return load_dataset(xke_edit_lang="zh", xke_protocol="teacher_forced", xke_data_file=str(data_dir))["test"]


def test_one_doc_per_record_with_questions_in_order(zh_docs):
    assert len(zh_docs) == 1037
    case = EditCase.from_doc(zh_docs[0]["xke"])
    assert [(q.role, q.lang, q.phase) for q in case.questions] == [
        ("reliability", "zh", "post"),
        ("reliability", "en", "post"),
        ("generality", "en", "post"),
        ("generality", "zh", "post"),
        ("locality", "en", "pre"),
        ("locality", "zh", "pre"),
        ("locality", "en", "post"),
        ("locality", "zh", "post"),
        ("portability", "en", "post"),
        ("portability", "zh", "post"),
    ]
    request = case.requests[0]
    assert request.lang == "zh" and request.subject in request.prompt
    assert case.source["sha256"].startswith("01620cf1") and case.source["f1"] == "harmonic"
    assert zh_docs[0]["prompt"] == request.prompt


def test_teacher_forced_scores_by_hand(zh_docs):
    doc = zh_docs[0]
    case = EditCase.from_doc(doc["xke"])
    results = []
    for q in case.questions:
        if q.role == "reliability" and q.lang == "zh":
            results.append(readout("2006年", "2006年", [5, 6], [5, 6]))  # exact: EM 1, F1 1
        elif q.role == "generality" and q.lang == "en":
            results.append(readout("2007", "2006", [1, 2, 2, 3], [2, 2, 4]))  # overlap 2: P .5, R 2/3
        elif q.role == "locality" and q.lang == "en":
            # pre and post answers identical -> EM 1 regardless of the loc_ans target
            results.append(readout("The Strong", "The String", [7, 8], [7, 9]))
        elif q.role == "locality" and q.lang == "zh":
            ids = [1] if q.phase == "pre" else [2]
            results.append(readout("甲" if q.phase == "pre" else "乙", "x", ids, [1]))  # changed -> 0, zero overlap
        else:
            results.append(readout("", "x", [], [9]))  # empty answer against a target -> 0, 0
    scores = process_results(doc, results)
    assert set(scores) == set(METRICS)
    assert scores["reliability_zh_em"] == 1.0 and scores["reliability_zh_f1"] == 1.0
    assert scores["generality_en_em"] == 0.0 and scores["generality_en_f1"] == pytest.approx(4 / 7)
    assert scores["locality_en_em"] == 1.0 and scores["locality_en_f1"] == 1.0
    assert scores["locality_zh_em"] == 0.0 and scores["locality_zh_f1"] == 0.0
    assert scores["portability_en_f1"] == 0.0 and scores["reliability_en_em"] == 0.0


def test_legacy_pr_formula_is_selectable(data_dir):
    docs = load_dataset(
        xke_edit_lang="en", xke_protocol="teacher_forced", xke_f1="legacy_pr", xke_data_file=str(data_dir)
    )
    doc = docs["test"][0]
    case = EditCase.from_doc(doc["xke"])
    results = [readout("a", "b", [1, 2, 2, 3], [2, 2, 4]) for _ in case.questions]
    assert process_results(doc, results)["reliability_en_f1"] == pytest.approx(1 / 3)


def test_generation_protocol_normalises_per_language(data_dir):
    doc = load_dataset(xke_edit_lang="en", xke_protocol="generate", xke_data_file=str(data_dir))["test"][0]
    case = EditCase.from_doc(doc["xke"])
    answers = []
    for q in case.questions:
        if q.role == "reliability" and q.lang == "en":
            answers.append(" 2006.")  # normalised equal to "2006"
        elif q.role == "reliability" and q.lang == "zh":
            answers.append("２００６年")  # full-width digits, NFKC-equal to "2006年"
        elif q.role == "locality":
            answers.append("same answer")
        else:
            answers.append("nothing")
    scores = process_results(doc, answers)
    assert scores["reliability_en_em"] == 1.0 and scores["reliability_zh_em"] == 1.0
    assert scores["locality_en_em"] == 1.0 and scores["locality_zh_f1"] == 1.0
    assert scores["generality_en_em"] == 0.0


def test_plain_hf_results_get_a_clear_error(zh_docs):
    doc = zh_docs[0]
    n = len(doc["xke"]["questions"])
    with pytest.raises(ValueError, match="--model xke"):
        process_results(doc, [(-1.0, False)] * n)


def test_unknown_f1_formula_is_refused(data_dir):
    with pytest.raises(ValueError, match="harmonic, legacy_pr"):
        load_dataset(xke_edit_lang="en", xke_protocol="teacher_forced", xke_f1="macro", xke_data_file=str(data_dir))
