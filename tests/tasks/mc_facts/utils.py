"""``custom_dataset`` loader of ``mc_facts_<lang>``: the questions of ``facts.py`` as lm-eval multiple-choice docs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

#: The words around each question, per language
LABELS = {
    "en": ("Question:", "Answer:"),
    "zh": ("问题：", "答案："),
    "fr": ("Question :", "Réponse :"),
    "de": ("Frage:", "Antwort:"),
    "ja": ("質問：", "答え："),
}


def _questions() -> list[dict]:
    # loaded by path: lm-eval imports this file by path too, so `facts` is not importable as a module name
    spec = importlib.util.spec_from_file_location("mc_facts_questions", Path(__file__).with_name("facts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.QUESTIONS


def load_dataset(**options: Any) -> DatasetDict:
    """One doc per question in ``options["lang"]``; the right choice moves round the four positions."""
    lang = options["lang"]
    question_word, answer_word = LABELS[lang]
    docs = []
    for i, row in enumerate(_questions()):
        question, choices = row[lang]
        gold = i % len(choices)
        rotated = choices[1 : gold + 1] + [choices[0]] + choices[gold + 1 :]
        docs.append({"id": i, "text": f"{question_word} {question}\n{answer_word}", "choices": rotated, "gold": gold})
    return DatasetDict({"test": Dataset.from_list(docs)})
