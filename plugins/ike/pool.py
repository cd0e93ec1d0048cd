"""IKE's demonstration pool: training facts in one or more languages, and their retrieval by similarity.

A pool is read from record-aligned files, each given as ``LANG:PATH``: record i of every file describes the same
training fact. ``.txt`` files hold ``question<TAB>answer`` lines; ``.json`` files hold a list of ZsRE records
``{src, alt, rephrase, loc, loc_ans}``. A language's question and answer come from the first file that has them
(later files must agree on the question: that checks the alignment); ``rephrase`` gives update demonstrations and
``loc``/``loc_ans`` retain demonstrations.

Retrieval is TF-IDF over character 2-4-grams (scikit-learn, a dependency of lm-eval): it needs no model download,
treats every script alike (Chinese has no spaces to split words on), and is deterministic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from lm_eval_xke.data import DataFile, DataNotFoundError, locate
from lm_eval_xke.editors import EditorError

log = logging.getLogger("lm_eval.models.xke.pool")

#: The default pool: the MzsRE training pairs (en, and their line-by-line zh translation) for the facts, then the
#: full English ZsRE training records (same order) for paraphrases and unrelated (retain) questions.
DEFAULT_POOL: tuple[tuple[str, DataFile], ...] = (
    (
        "en",
        DataFile(
            "train/zsre_mend_train_en_10000.txt",
            sha256="247d69166cf25380471f9373345562f117e67df506228db178b0e734614610fb",
        ),
    ),
    (
        "zh",
        DataFile(
            "train/zsre_mend_train_zh_10000.txt",
            sha256="3884471ec1ea2c32a5809a0fad6d7d701fec3fdb6465f87a3b37fefec0ca56b4",
        ),
    ),
    (
        "en",
        DataFile(
            "train/zsre_mend_train_en_10000.json",
            sha256="86f1d06ad075dc806fd046cc292b866726ff981fdf2c14a7d933fa12dd5c5010",
        ),
    ),
)


@dataclass
class PoolFact:
    """One training fact: question and answer per language, paraphrased questions, one unrelated question."""

    questions: dict[str, str] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)
    paraphrases: dict[str, str] = field(default_factory=dict)
    neighbour: tuple[str, str] | None = None  # (question, answer) of an unrelated fact


@dataclass(frozen=True)
class PoolRecord:
    """What one file says about one fact (empty strings: nothing)."""

    question: str = ""
    answer: str = ""
    paraphrase: str = ""
    neighbour: tuple[str, str] | None = None


def parse_entry(entry: str) -> tuple[str, Path]:
    lang, sep, path = entry.partition(":")
    if not sep or not lang.isalnum() or not path:
        raise EditorError(f"demo_pool entry {entry!r} must be LANG:PATH, e.g. en:/data/train_en.txt")
    return lang, Path(path).expanduser()


def default_entries() -> list[tuple[str, Path]]:
    """The default pool's files, located like the benchmark files (``$XKE_DATA_DIR/train/...``)."""
    try:
        return [(lang, locate(spec)) for lang, spec in DEFAULT_POOL]
    except DataNotFoundError as err:
        raise EditorError(
            f"IKE's default demonstration pool is missing: {err}\n"
            "Or give your own pool: demo_pool=en:/path/train_en.txt|zh:/path/train_zh.txt, or k=0 for no "
            "retrieved demonstrations."
        ) from None


def read_records(path: Path) -> list[PoolRecord]:
    """The records of one pool file (``.txt`` or ``.json``), one per line / list item."""
    if not path.is_file():
        raise EditorError(f"demo_pool file {path} does not exist")
    if path.suffix == ".json":
        return _json_records(path)
    if path.suffix == ".txt":
        return _txt_records(path)
    raise EditorError(f"demo_pool file {path} must be .txt (question<TAB>answer lines) or .json (ZsRE records)")


def _txt_records(path: Path) -> list[PoolRecord]:
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): it also splits at U+2028 and the like
    if lines[-1] == "":
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        parts = line.rstrip("\r").split("\t")
        if len(parts) > 2:
            raise EditorError(f"{path}:{number}: expected 'question<TAB>answer', got {len(parts) - 1} tabs")
        # a question without a tab has no answer (the translated ReMaKE pools have 35, where the English answer is
        # empty): like an empty line, it is a record without a pair, counted in ``DemoPool.unpaired``
        question, answer = (p.strip() for p in parts) if len(parts) == 2 else ("", "")
        records.append(PoolRecord(question, answer) if question and answer else PoolRecord())
    return records


def _json_records(path: Path) -> list[PoolRecord]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EditorError(f"demo_pool file {path} is not valid JSON: {err}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise EditorError(f"demo_pool file {path} must hold a JSON list of records {{src, alt, rephrase, loc, ...}}")

    def text(record: dict, key: str) -> str:
        value = record.get(key)
        return value.strip() if isinstance(value, str) else ""

    return [
        PoolRecord(
            question=text(r, "src"),
            answer=text(r, "alt"),
            paraphrase=text(r, "rephrase"),
            neighbour=(text(r, "loc"), text(r, "loc_ans")) if text(r, "loc") and text(r, "loc_ans") else None,
        )
        for r in data
    ]


def merge_records(files: Sequence[tuple[str, Path, list[PoolRecord]]]) -> list[PoolFact]:
    """Fold the aligned records of every file into facts; facts without any question-answer pair are dropped."""
    counts = {len(records) for _, _, records in files}
    if len(counts) > 1:
        sizes = ", ".join(f"{path.name}: {len(records)}" for _, path, records in files)
        raise EditorError(f"demo_pool files must be record-aligned (same number of records), got {sizes}")
    facts = [PoolFact() for _ in range(counts.pop() if counts else 0)]
    for lang, path, records in files:
        for index, (fact, record) in enumerate(zip(facts, records, strict=True)):
            _fold(fact, lang, record, f"{path}, record {index + 1}")
    return [f for f in facts if f.answers]


def _fold(fact: PoolFact, lang: str, record: PoolRecord, where: str) -> None:
    if record.question and record.answer:
        known = fact.questions.get(lang)
        if known is not None and known != record.question:
            raise EditorError(
                f"demo_pool files are not aligned: {where} asks {record.question!r}, an earlier {lang} file asks "
                f"{known!r}"
            )
        fact.questions.setdefault(lang, record.question)
        fact.answers.setdefault(lang, record.answer)
    if record.paraphrase:
        fact.paraphrases.setdefault(lang, record.paraphrase)
    if record.neighbour and fact.neighbour is None:
        fact.neighbour = record.neighbour


class LanguageIndex:
    """TF-IDF over character 2-4-grams of ``"question answer"`` of the facts that have one in a language."""

    def __init__(self, facts: Sequence[PoolFact], lang: str) -> None:
        self.fact_ids = np.array([i for i, f in enumerate(facts) if lang in f.answers])
        texts = [f"{facts[i].questions[lang]} {facts[i].answers[lang]}" for i in self.fact_ids]
        self.vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, dtype=np.float32)
        self.matrix = self.vectorizer.fit_transform(texts)  # rows are L2-normalised: dot products are cosines

    def nearest(self, text: str, k: int) -> list[int]:
        """Indices (into the pool's facts) of the ``k`` most similar facts, most similar first; ties by index."""
        scores = (self.matrix @ self.vectorizer.transform([text]).T).toarray().ravel()
        order = np.argsort(-scores, kind="stable")[:k]
        return [int(i) for i in self.fact_ids[order]]


class DemoPool:
    """The facts of a pool and one retrieval index per language."""

    def __init__(self, facts: list[PoolFact], sources: list[str], unpaired: dict[str, int] | None = None) -> None:
        if not facts:
            raise EditorError(f"the demonstration pool {sources} holds no question-answer pairs")
        self.facts = facts
        self.sources = sources
        self.unpaired = dict(unpaired or {})  # per source, its records without a question-answer pair (unused)
        self.langs = sorted({lang for f in facts for lang in f.answers})
        self._indexes: dict[str, LanguageIndex] = {}

    @classmethod
    def load(cls, entries: Sequence[tuple[str, Path]]) -> DemoPool:
        files = [(lang, path, read_records(path)) for lang, path in entries]
        unpaired = {
            f"{lang}:{path}": missing
            for lang, path, records in files
            if (missing := sum(1 for r in records if not (r.question and r.answer)))
        }
        if unpaired:
            log.info("demonstration pool: records without a question-answer pair (not used): %s", unpaired)
        return cls(merge_records(files), [f"{lang}:{path}" for lang, path in entries], unpaired)

    def nearest(self, lang: str, text: str, k: int) -> list[int]:
        if lang not in self._indexes:  # built on first use: most runs edit in one or two languages
            self._indexes[lang] = LanguageIndex(self.facts, lang)
        return self._indexes[lang].nearest(text, k)


def load_pool(entries: Sequence[tuple[str, Path]]) -> DemoPool:
    """The pool of ``entries``, read once per process (and again only if a file changes)."""
    return _cached_pool(tuple((lang, str(path), _stamp(path)) for lang, path in entries))


@lru_cache(maxsize=4)
def _cached_pool(key: tuple[tuple[str, str, tuple[int, int]], ...]) -> DemoPool:
    return DemoPool.load([(lang, Path(path)) for lang, path, _ in key])


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat() if path.is_file() else None
    return (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)
