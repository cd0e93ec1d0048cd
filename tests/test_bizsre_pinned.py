"""Bi-ZsRE's docs and scores are pinned: the parallel-table refactor (and any later one) must not change them.

The digests were written from the code before the refactor onto the shared multilingual machinery. Each covers,
for one task configuration, every doc the loader builds from the real ``bizsre_test.json`` and the scores that
``process_results`` gives them for deterministic synthetic answers (right, wrong and partly right, both protocols).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from lm_eval_xke.cases import EditCase
from lm_eval_xke.tasks.bizsre.utils import load_dataset, process_results

PINNED = {
    ("en", "teacher_forced", "single"): "8d39bd1f8d3c648966240040060307d1012b7851aed8c1bb08083a7663ccd5fb",
    ("zh", "teacher_forced", "single"): "abbe2587bb1640445fd43ed128491bdce5fcc8df3db57eb330b1f3cd6c89edb2",
    ("en", "generate", "single"): "fd794553b18af75b67daa1f5d69c49aa2318f6b6178efd1ed9dea156d478d2ad",
    ("zh", "generate", "single"): "9b05a3ffe87d29994796bb4f7d0c2a900dbaea061a776a33c67ab48095d223c7",
    ("en", "teacher_forced", "sequential"): "76768d537647746638fff2fdf485ad22365b9c43baf869f72ef1c1801fb26675",
    ("zh", "generate", "sequential"): "7ef9856cdae880fcc7a8158e7b39c73ee86a1f6ba13cf15d23ef30579b0ae50f",
}


def synthetic_result(case: EditCase, doc_index: int, position: int):
    """A deterministic answer to question ``position``: right, wrong or partly right, by position."""
    question = case.questions[position]
    gold = question.answers[0]
    kind = (doc_index + position) % 3
    answer = gold if kind == 0 else ("nothing" if kind == 1 else gold[: max(1, len(gold) // 2)])
    if question.protocol == "generate":
        return answer
    ids = [ord(c) % 97 for c in answer]
    readout = {"answer": answer, "target": gold, "answer_ids": ids, "target_ids": [ord(c) % 97 for c in gold]}
    return (-1.5, kind == 0, json.dumps(readout, ensure_ascii=False))


def digest(edit_lang: str, protocol: str, mode: str, data_dir) -> str:
    docs = load_dataset(xke_edit_lang=edit_lang, xke_protocol=protocol, xke_data_file=str(data_dir), edit_mode=mode)[
        "test"
    ]
    h = hashlib.sha256()
    for index, doc in enumerate(docs):
        case = EditCase.from_doc(doc["xke"])
        results = [synthetic_result(case, index, i) for i in range(len(case.questions))]
        scores = process_results(doc, results)
        h.update(json.dumps([doc, scores], sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


@pytest.mark.parametrize("config", sorted(PINNED))
def test_bizsre_docs_and_scores_unchanged(config, data_dir):
    assert digest(*config, data_dir) == PINNED[config]
