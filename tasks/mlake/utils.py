"""MLaKE: records -> edit cases (loaders), edit-request derivation, and per-case scoring.

Three task families share the edit request of single-hop row ``i`` in the edit language (``derive_edit``):

- ``mlake_<edit>``: one doc per single-hop row; the row's question in all five languages, asked after the edit
  and generated greedily (``load_dataset`` / ``process_results``);
- ``mlake_multihop_<test>``: one doc per post-edit multi-hop question of the test language, joined to its
  single-hop row through the English ``e_prompt`` (``load_multihop_dataset`` / ``process_multihop_results``);
- ``mlake_mc_<edit>``: one doc per single-hop row; the four options of the row's multiple-choice question in
  all five languages, each one loglikelihood request (``load_mc_dataset`` / ``process_mc_results``).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections import Counter
from dataclasses import dataclass
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
from lm_eval_xke.data import (
    MCQA_LETTERS,
    MLAKE_LANGS,
    SKIP_HINT,
    MlakeData,
    RecordError,
    RecordProblem,
    flag_option,
    load_mlake,
)
from lm_eval_xke.failed_edits import is_failed_answer
from lm_eval_xke.metrics import CHAR_LEVEL_LANGS, contains_match, normalized_em
from lm_eval_xke.parallel import strip_span

log = logging.getLogger("lm_eval.tasks.mlake")

LANGS = MLAKE_LANGS
QA_METRICS = tuple(
    f"{role}_{lang}_{m}" for role in ("reliability", "old_answer") for lang in LANGS for m in ("em", "contains")
)
MC_METRICS = tuple(f"{role}_{lang}_acc" for role in ("reliability", "old_answer") for lang in LANGS)
EDIT_RULES = ("before_answer", "common_prefix", "question")


class DerivationError(ValueError):
    """No usable edit request (prompt containing a subject) could be derived from a record."""


# ---------------------------------------------------------------- edit requests


@dataclass(frozen=True)
class DerivedEdit:
    request: EditRequest
    rule: str  # how the prompt was found: one of EDIT_RULES


def _is_cjk(lang: str) -> bool:
    return lang in CHAR_LEVEL_LANGS


def _strip_edges(text: str) -> str:
    start, end = strip_span(text, 0, len(text))
    return text[start:end]


def _word_span(text: str, start: int, end: int, lang: str) -> str:
    """``text[start:end]`` without partial words at its ends (whitespace languages), edges stripped."""
    if not _is_cjk(lang):
        if start > 0 and text[start - 1].isalnum():
            while start < end and text[start].isalnum():
                start += 1
        if end < len(text) and text[end].isalnum():
            while end > start and text[end - 1].isalnum():
                end -= 1
    return _strip_edges(text[start:end])


def _prompt_before_answer(record: dict, lang: str) -> tuple[str, str]:
    """The edit prompt (ending right before the new answer) and the rule that found it."""
    e_prompt, answer = record["e_prompt"], record["e_answer"]
    position = e_prompt.find(answer)
    if position > 0 and _strip_edges(e_prompt[:position]):
        return e_prompt[:position].rstrip(), "before_answer"
    prefix = os.path.commonprefix([record["o_prompt"], e_prompt])
    end = len(prefix)
    if not _is_cjk(lang) and 0 < end < len(e_prompt) and e_prompt[end].isalnum():
        while end > 0 and e_prompt[end - 1].isalnum():  # the two answers share a partial word: cut it
            end -= 1
    if position < 0 and _strip_edges(e_prompt[:end]):
        return e_prompt[:end].rstrip(), "common_prefix"
    question = record["question"].rstrip()
    return (question if _strip_edges(question) else ""), "question"


def _subject(prompt: str, other: str, lang: str) -> str:
    """The longest run of whole words (characters for zh/ja) that ``prompt`` shares with ``other``, else ``prompt``."""
    a, b = prompt.lower(), other.lower()
    if len(a) != len(prompt):  # lower() changed lengths: indices would not map back
        a, b = prompt, other
    match = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    span = _word_span(prompt, match.a, match.a + match.size, lang)
    if len(span) >= (2 if _is_cjk(lang) else 3):
        return span
    return _strip_edges(prompt)


def derive_edit(record: dict, lang: str, index: int) -> DerivedEdit:
    """The edit request of a single-hop record: prompt ending before ``e_answer``, subject inside it (README)."""
    prompt, rule = _prompt_before_answer(record, lang)
    if not prompt:
        raise DerivationError(
            f"record {index} ({lang}): field 'e_prompt': no edit prompt: e_prompt, o_prompt and question hold no words"
        )
    other = record["question"] if rule != "question" else record["e_prompt"].replace(record["e_answer"], " ")
    subject = _subject(prompt, other, lang)
    if not subject or subject not in prompt:
        raise DerivationError(
            f"record {index} ({lang}): field 'e_prompt': no subject could be derived from prompt {prompt!r}"
        )
    return DerivedEdit(EditRequest(prompt=prompt, subject=subject, target_new=record["e_answer"], lang=lang), rule)


# ---------------------------------------------------------------- options


def _lang_option(options: dict, key: str, default: str | None = None) -> str:
    value = str(options.get(key, default) or "")
    if value not in LANGS:
        raise ValueError(f"{key} must be one of {', '.join(LANGS)}, got {value!r}")
    return value


@dataclass
class _Edits:
    """Derived edit requests of the single-hop rows of one edit language, and what could not be derived."""

    by_index: dict[int, DerivedEdit]
    data: MlakeData
    failed: list[RecordProblem]

    def summary(self, kept: int) -> dict:
        """Edit-prompt rules used, and how many valid or derivable rows were not kept (``kept`` docs)."""
        return {
            "edit_rules": dict(Counter(d.rule for d in self.by_index.values())),
            "underivable_indices": [p.index for p in self.failed],
            "skipped_invalid": self.data.size - kept,
        }


def _derive_all(lang: str, data_path: Any, skip_invalid: bool) -> _Edits:
    data = load_mlake("single_qa", lang, data_path, skip_invalid)
    by_index: dict[int, DerivedEdit] = {}
    failed: list[RecordProblem] = []
    for index, record in data.records:
        try:
            by_index[index] = derive_edit(record, lang, index)
        except DerivationError as err:
            problem = RecordProblem(index, lang, "e_prompt", str(err))
            if not skip_invalid:
                raise RecordError(f"{data.path.name} {err}. {SKIP_HINT}", problem) from None
            failed.append(problem)
    if failed:
        log.warning("MLaKE %s: no edit request for records %s (skipped)", lang, [p.index for p in failed])
    return _Edits(by_index, data, failed)


def _check_aligned(files: list[MlakeData], skip_invalid: bool) -> None:
    """Single-hop files are aligned by record index across languages: a file with fewer records lost some."""
    sizes = {data.path.name: data.size for data in files}
    if len(set(sizes.values())) > 1 and not skip_invalid:
        counts = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise RecordError(
            f"MLaKE single-hop files are aligned by record index across languages, but their record counts differ "
            f"({counts}): use the files of one MLaKE release, or pass xke_skip_invalid=true to keep only the "
            "records every language has (the others are counted in the results)."
        )


def _join_index(english: MlakeData, skip_invalid: bool) -> dict[str, int]:
    """English single-hop ``e_prompt`` -> row index: the key that links a multi-hop question to its edit.

    A key shared by several rows is ambiguous: an error, or (skipping) no row, so its questions count as unjoined.
    """
    rows: dict[str, list[int]] = {}
    for index, record in english.records:
        rows.setdefault(record["e_prompt"], []).append(index)
    shared = [indices for indices in rows.values() if len(indices) > 1]
    if shared and not skip_invalid:
        first, second = shared[0][:2]
        problem = RecordProblem(second, "en", "e_prompt", f"field 'e_prompt' repeats record {first}'s")
        raise RecordError(
            f"{problem.describe(english.path.name)}: it must be unique, since it links multi-hop questions to "
            f"their edit. {SKIP_HINT}",
            problem,
        )
    if shared:
        log.warning("MLaKE: English single-hop rows %s share an e_prompt; their questions are unjoined", shared)
    return {key: indices[0] for key, indices in rows.items() if len(indices) == 1}


def _source(file: str, data: MlakeData, records: int, protocol: str, options: dict, **extra: Any) -> dict:
    return {
        "file": file,
        "sha256": data.sha256,
        "records": records,
        "protocol": protocol,
        "f1": "n/a",
        "task_options": task_options_seen(options),
        **extra,
    }


# ---------------------------------------------------------------- single-hop QA (generation)


def load_dataset(**options: Any) -> DatasetDict:
    """``custom_dataset`` loader of ``mlake_<lang>``: one doc per single-hop row, edited in ``xke_edit_lang``.

    Options: ``xke_edit_lang`` (fixed by the task YAML), ``xke_data_file`` (folder with the shared-data layout),
    ``xke_skip_invalid`` (skip invalid or underivable rows instead of failing; counted in the results).
    """
    edit_lang = _lang_option(options, "xke_edit_lang")
    skip = flag_option(options, "xke_skip_invalid")
    edits = _derive_all(edit_lang, options.get("xke_data_file"), skip)
    tests = {lang: load_mlake("single_qa", lang, options.get("xke_data_file"), skip) for lang in LANGS}
    _check_aligned([edits.data, *tests.values()], skip)
    rows = {lang: dict(data.records) for lang, data in tests.items()}
    indices = [i for i in sorted(edits.by_index) if all(i in rows[lang] for lang in LANGS)]
    source = _source(
        f"mlake/single_hop/qa (edit {edit_lang})",
        edits.data,
        len(indices),
        "generate",
        options,
        sha256_per_lang={lang: data.sha256 for lang, data in tests.items()},
        final_phase=wants_final_phase(options),
        **edits.summary(len(indices)),
    )
    docs = [_qa_doc(i, edits.by_index[i], edit_lang, rows, source) for i in indices]
    return DatasetDict({"test": Dataset.from_list(docs)})


def _qa_doc(index: int, edit: DerivedEdit, edit_lang: str, rows: dict, source: dict) -> dict:
    questions = [
        Question(
            role="reliability",
            lang=lang,
            prompt=rows[lang][index]["question"],
            answers=(rows[lang][index]["e_answer"], *rows[lang][index]["e_answer_aliases"]),
            protocol="generate",
        )
        for lang in LANGS
    ]
    if source["final_phase"]:
        questions = with_final_phase(tuple(questions))
    case = EditCase(f"mlake-{edit_lang}-{index}", (edit.request,), tuple(questions), source)
    old = {lang: [rows[lang][index]["o_answer"], *rows[lang][index]["o_answer_aliases"]] for lang in LANGS}
    return {
        "record_index": index,
        "edit_rule": edit.rule,
        "prompt": rows[edit_lang][index]["question"],
        "target": edit.request.target_new,
        "old_answers": old,
        "xke": case.to_doc(),
    }


#: what a failed edit scores (``old_answer_*``: lower is better)
FAILED_SCORE = {"reliability": 0.0, "old_answer": 1.0}


def process_results(doc: dict, results: list) -> dict[str, float]:
    """``reliability_<l>_{em,contains}``: new answer given; ``old_answer_<l>_{em,contains}``: old one still given.

    Re-asked ``final`` questions (sequential runs) score reliability only, as ``reliability_<l>_<m>_final``.
    """
    case = EditCase.from_doc(doc["xke"])
    scores: dict[str, float] = {}
    for question, result in zip(case.questions, results, strict=True):
        roles = [("reliability", question.answers)]
        if question.phase == "post":
            roles.append(("old_answer", doc["old_answers"][question.lang]))
        suffix = metric_suffix(question)
        failed = is_failed_answer(result)
        for role, golds in roles:
            lang = question.lang
            if failed:  # the edit failed: the worst score, new answer not given, old one (lower is better) kept
                scores[f"{role}_{lang}_em{suffix}"] = scores[f"{role}_{lang}_contains{suffix}"] = FAILED_SCORE[role]
                continue
            scores[f"{role}_{lang}_em{suffix}"] = normalized_em(result, golds, lang)
            scores[f"{role}_{lang}_contains{suffix}"] = contains_match(result, golds, lang)
    return scores


# ---------------------------------------------------------------- multi-hop QA (generation)


def load_multihop_dataset(**options: Any) -> DatasetDict:
    """``custom_dataset`` loader of ``mlake_multihop_<test>``: one doc per post-edit multi-hop question.

    The question's English ``e_prompt`` names the English single-hop row; the edit is that row's request in
    ``xke_mlake_edit_lang`` (default en). Questions that cannot be joined, or whose edit could not be derived,
    are counted and listed in the results (``unjoined``), never dropped silently.
    """
    test_lang = _lang_option(options, "xke_mlake_test_lang")
    edit_lang = _lang_option(options, "xke_mlake_edit_lang", "en")
    path, skip = options.get("xke_data_file"), flag_option(options, "xke_skip_invalid")
    row_of = _join_index(load_mlake("single_qa", "en", path, skip), skip)
    edits = _derive_all(edit_lang, path, skip)
    questions = load_mlake("multi_qa", test_lang, path, skip)
    joined, unjoined = [], []
    for index, record in questions.records:
        row = row_of.get(record["e_prompt"])
        (joined if row is not None and row in edits.by_index else unjoined).append((index, record, row))
    if unjoined:
        log.warning("MLaKE multi-hop %s: %d questions could not be joined to an edit", test_lang, len(unjoined))
    source = _source(
        f"mlake/multi_hop/qa/new_{test_lang}_qa.json (edit {edit_lang})",
        questions,
        len(joined),
        "generate",
        options,
        skipped_invalid=len(questions.skipped),
        questions_in_file=len(questions.records) + len(questions.skipped),
        joined=len(joined),
        unjoined=len(unjoined),
        unjoined_indices=[index for index, _, _ in unjoined],
        distinct_edits=len({row for _, _, row in joined}),
        edit_lang=edit_lang,
    )
    docs = [_multihop_doc(i, r, row, edits.by_index[row], test_lang, edit_lang, source) for i, r, row in joined]
    return DatasetDict({"test": Dataset.from_list(docs)})


def _multihop_doc(
    index: int, record: dict, row: int, edit: DerivedEdit, test_lang: str, edit_lang: str, source: dict
) -> dict:
    question = Question(
        role="multihop",
        lang=test_lang,
        prompt=record["question"],
        answers=(record["e_answer"], *record["e_answer_aliases"]),
        protocol="generate",
    )
    case = EditCase(f"mlake-multihop-{test_lang}-{index}-edit-{edit_lang}-{row}", (edit.request,), (question,), source)
    return {
        "record_index": index,
        "edit_index": row,
        "prompt": record["question"],
        "target": record["e_answer"],
        "xke": case.to_doc(),
    }


def process_multihop_results(doc: dict, results: list) -> dict[str, float]:
    """``multihop_<l>_em`` and ``multihop_<l>_contains`` of the one post-edit question."""
    (question,) = EditCase.from_doc(doc["xke"]).questions
    (result,) = results
    if is_failed_answer(result):  # the edit failed
        return {f"multihop_{question.lang}_em": 0.0, f"multihop_{question.lang}_contains": 0.0}
    return {
        f"multihop_{question.lang}_em": normalized_em(result, question.answers, question.lang),
        f"multihop_{question.lang}_contains": contains_match(result, question.answers, question.lang),
    }


# ---------------------------------------------------------------- single-hop multiple choice (loglikelihood)


def load_mc_dataset(**options: Any) -> DatasetDict:
    """``custom_dataset`` loader of ``mlake_mc_<lang>``: one doc per single-hop row, edited in ``xke_edit_lang``.

    The edit request comes from the QA file (the MCQA file's answers are letters); the questions are the four
    options of the row's multiple-choice question in every language, one loglikelihood request each.
    """
    edit_lang = _lang_option(options, "xke_edit_lang")
    path, skip = options.get("xke_data_file"), flag_option(options, "xke_skip_invalid")
    edits = _derive_all(edit_lang, path, skip)
    tests = {lang: load_mlake("single_mcqa", lang, path, skip) for lang in LANGS}
    _check_aligned([edits.data, *tests.values()], skip)
    rows = {lang: dict(data.records) for lang, data in tests.items()}
    indices = [i for i in sorted(edits.by_index) if all(i in rows[lang] for lang in LANGS)]
    source = _source(
        f"mlake/single_hop/mcqa (edit {edit_lang})",
        tests[edit_lang],
        len(indices),
        "teacher_forced",
        options,
        sha256_per_lang={lang: data.sha256 for lang, data in tests.items()},
        edit_sha256=edits.data.sha256,
        **edits.summary(len(indices)),
    )
    docs = [_mc_doc(i, edits.by_index[i], edit_lang, rows, source) for i in indices]
    return DatasetDict({"test": Dataset.from_list(docs)})


def _mc_doc(index: int, edit: DerivedEdit, edit_lang: str, rows: dict, source: dict) -> dict:
    questions, keys = [], []
    for lang in LANGS:
        record = rows[lang][index]
        questions += [
            Question(role="reliability", lang=lang, prompt=record["question"], answers=(option,))
            for option in record["options"]
        ]
        keys.append(
            {
                "lang": lang,
                "new": MCQA_LETTERS.index(record["e_answer"]),
                "old": MCQA_LETTERS.index(record["o_answer"]),
            }
        )
    case = EditCase(f"mlake-mc-{edit_lang}-{index}", (edit.request,), tuple(questions), source)
    return {
        "record_index": index,
        "prompt": rows[edit_lang][index]["question"],
        "target": rows[edit_lang][index]["options"][MCQA_LETTERS.index(rows[edit_lang][index]["e_answer"])],
        "mc_keys": keys,
        "xke": case.to_doc(),
    }


def _loglikelihood(result: Any) -> float:
    """lm-eval's loglikelihood response: (ll, is_greedy), or xke's (ll, is_greedy, read-out JSON)."""
    return float(result[0])


def process_mc_results(doc: dict, results: list) -> dict[str, float]:
    """``reliability_<l>_acc``: the new option has the highest loglikelihood; ``old_answer_<l>_acc``: the old one."""
    n = len(MCQA_LETTERS)
    if len(results) != n * len(doc["mc_keys"]):
        raise ValueError(f"expected {n} loglikelihoods per language, got {len(results)} results")
    scores: dict[str, float] = {}
    for group, key in enumerate(doc["mc_keys"]):
        group_results = results[group * n : (group + 1) * n]
        lls = [_loglikelihood(r) for r in group_results]
        if any(map(is_failed_answer, group_results)):  # the edit failed: the worst score of each role
            scores.update({f"{role}_{key['lang']}_acc": worst for role, worst in FAILED_SCORE.items()})
            continue
        chosen = max(range(n), key=lls.__getitem__)
        scores[f"reliability_{key['lang']}_acc"] = float(chosen == key["new"])
        scores[f"old_answer_{key['lang']}_acc"] = float(chosen == key["old"])
    return scores
