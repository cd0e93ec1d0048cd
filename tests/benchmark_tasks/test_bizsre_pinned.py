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
    ("en", "teacher_forced", "single"): "b5d3e6e531e2e0ab2ea4269329d825438ec3281961bd83392b331c2308e65fe9",
    ("zh", "teacher_forced", "single"): "33eca3df1dfe5e4a538562cfe3a2114bc27f9e7369e9bdf7573585002dc0fadb",
    ("en", "generate", "single"): "06d468a6895f264125fb5f20ff942297242d7661c87833e486424e2e49b4442f",
    ("zh", "generate", "single"): "ed58158e565ddf4fd8e892c4dd26509c4f419af7fc2bfd97fa920b83b17f8e16",
    ("en", "teacher_forced", "sequential"): "435e3cc1a865368656e9f6174e7d6186438b6bba047201d49b940a7cb160455e",
    ("zh", "generate", "sequential"): "9dba100df5e1e09e1bfcbdf0c43f08e8bb7ab282885dd52e4bfb5caf0aa82a28",
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


def digest(edit_lang: str, protocol: str, mode: str) -> str:
    """The data is found through ``XKE_DATA_DIR``: an ``xke_data_file`` path would be recorded in every doc."""
    docs = load_dataset(xke_edit_lang=edit_lang, xke_protocol=protocol, edit_mode=mode)["test"]
    h = hashlib.sha256()
    for index, doc in enumerate(docs):
        case = EditCase.from_doc(doc["xke"])
        results = [synthetic_result(case, index, i) for i in range(len(case.questions))]
        scores = process_results(doc, results)
        h.update(json.dumps([doc, scores], sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


@pytest.mark.parametrize("config", sorted(PINNED))
def test_bizsre_docs_and_scores_unchanged(config, data_dir, monkeypatch):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    assert digest(*config) == PINNED[config]
