"""Parallel tables -> edit cases, and their per-case scores: the machinery of Bi-ZsRE, MzsRE, BMIKE-53 and users' files.

One doc per record: the edit request in the edit language, then the questions in the test languages, in this order
(``Instance.idx``): reliability in the edit language, then in the other test languages (table order); generality
per test language; locality asked before the edit (``pre``) per test language, then after it; portability;
``old_answer`` (the pre-edit answer, where the data has one). Roles the table lacks are not asked. Under
``edit_mode=sequential`` every post question is asked once more after the run's last edit (``_final`` keys).

Scores (``process_results``): ``<role>_<lang>_em`` and ``<role>_<lang>_f1`` for every post question. Teacher-forced:
EM compares the argmax read-out with the gold string character for character, F1 is the token-id overlap of the
model's tokenizer (``xke_f1`` formula); generation: normalised EM/F1 (``lm_eval_xke.metrics``). Locality compares
with the pre-edit answer; ``old_answer`` with the data's old answer (lower is better). Tables marked ``xavg`` add
the cross-lingual summary ``<role>_xavg_<em|f1>``: the mean over the test languages other than the edit language.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
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
from lm_eval_xke.data import RecordError
from lm_eval_xke.failed_edits import is_failed_answer
from lm_eval_xke.metrics import F1_FORMULAS, exact_match, normalized_em, normalized_f1, token_f1
from lm_eval_xke.parallel import ROLE_FIELDS, ParallelRow, ParallelTable, locate_subject
from lm_eval_xke.parallel_data import load_user_table
from lm_eval_xke.responses import readout_of

log = logging.getLogger("lm_eval.tasks.xke")

#: how an edit subject was found in its prompt (``parallel.locate_subject``)
SUBJECT_METHODS = ("exact", "casefold", "fuzzy", "whole_prompt")
#: the per-role summary over the non-edit test languages
XAVG = "xavg"
#: what a failed edit scores: the worst value (lower is better for ``old_answer``)
FAILED_SCORE = {"old_answer": 1.0}
METRICS = ("em", "f1")


def parse_test_langs(value: Any, available: Sequence[str], default: Sequence[str]) -> tuple[str, ...]:
    """``xke_test_langs``: ``all``, or languages separated by ``|`` (model_args split on commas); else ``default``."""
    if value is None or str(value).strip() == "":
        return tuple(default)
    text = str(value).strip()
    if text == "all":
        return tuple(available)
    langs = tuple(dict.fromkeys(part.strip() for part in re.split(r"[|+ ]", text) if part.strip()))
    unknown = [lang for lang in langs if lang not in available]
    if unknown:
        raise ValueError(
            f"xke_test_langs: {', '.join(unknown)} not in this benchmark; use 'all' or '|'-separated codes from: "
            f"{' '.join(available)}"
        )
    return langs


def ordered_langs(edit_lang: str, test_langs: Sequence[str], table_langs: Sequence[str]) -> tuple[str, ...]:
    """The languages asked, in table order, the edit language always among them."""
    wanted = set(test_langs) | {edit_lang}
    return tuple(lang for lang in table_langs if lang in wanted)


def edit_requests(table: ParallelTable, edit_lang: str) -> tuple[dict[int, EditRequest], dict[str, Any]]:
    """Each row's edit request, with the subject located in the edit prompt; and how subjects were found."""
    found: Counter = Counter()
    fallback_indices: list[int] = []
    requests: dict[int, EditRequest] = {}
    for row in table.rows:
        block = row.blocks[edit_lang]
        subject, how = locate_subject(block["src"], block["subject"], edit_lang)
        found[how] += 1
        if how != "exact":
            fallback_indices.append(row.index)
        requests[row.index] = EditRequest(prompt=block["src"], subject=subject, target_new=block["alt"], lang=edit_lang)
    return requests, {
        "lang": edit_lang,
        **{k: found[k] for k in SUBJECT_METHODS},
        "indices": fallback_indices,
    }


def case_doc(
    row: ParallelRow,
    request: EditRequest,
    langs: Sequence[str],
    roles: Sequence[str],
    protocol: str,
    source: dict[str, Any],
    case_prefix: str,
) -> dict[str, Any]:
    """One lm-eval doc: ``record_index``, the edit prompt and target (for lm-eval's own rendering), and the case."""
    edit_lang = request.lang

    def ask(role: str, lang: str, phase: str = "post") -> Question:
        question, answer = ROLE_FIELDS[role]
        block = row.blocks[lang]
        return Question(role, lang, block[question], (block[answer],), phase=phase, protocol=protocol)

    questions: list[Question] = []
    for role in roles:
        if role == "reliability":
            questions += [ask(role, edit_lang), *(ask(role, lang) for lang in langs if lang != edit_lang)]
        elif role == "locality":
            questions += [ask(role, lang, "pre") for lang in langs] + [ask(role, lang) for lang in langs]
        else:
            questions += [ask(role, lang) for lang in langs]
    if source["final_phase"]:
        questions = list(with_final_phase(tuple(questions)))
    case = EditCase(f"{case_prefix}-{row.key}", (request,), tuple(questions), source)
    return {"record_index": row.index, "prompt": request.prompt, "target": request.target_new, "xke": case.to_doc()}


def table_docs(
    table: ParallelTable,
    requests: Mapping[int, EditRequest],
    langs: Sequence[str],
    protocol: str,
    source: dict[str, Any],
    case_prefix: str,
) -> list[dict[str, Any]]:
    return [case_doc(row, requests[row.index], langs, table.roles, protocol, source, case_prefix) for row in table.rows]


# ---------------------------------------------------------------- scoring


def process_results(doc: dict, results: list) -> dict[str, float]:
    """Score one case (module docstring): every post question, locality against the pre-edit answer."""
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
    if case.source.get(XAVG):
        scores.update(_cross_lingual_means(case, scores))
    return scores


def _cross_lingual_means(case: EditCase, scores: dict[str, float]) -> dict[str, float]:
    """``<role>_xavg_<m>``: the mean of a role's scores over the test languages other than the edit language."""
    edit_lang = case.requests[0].lang
    groups: dict[str, list[float]] = {}
    for question in case.questions:
        if question.phase == "pre" or question.lang == edit_lang:
            continue
        for metric in METRICS:
            key = f"{question.role}_{XAVG}_{metric}{metric_suffix(question)}"
            groups.setdefault(key, []).append(
                scores[f"{question.role}_{question.lang}_{metric}{metric_suffix(question)}"]
            )
    return {key: sum(values) / len(values) for key, values in groups.items()}


def _score(question: Question, result: Any, reference: Any, f1_formula: str) -> tuple[float, float]:
    if is_failed_answer(result):
        worst = FAILED_SCORE.get(question.role, 0.0)  # a failed edit scores the worst value, locality included
        return worst, worst
    if question.protocol == "teacher_forced":
        answer = readout_of(result)
        if reference is None:
            return exact_match(answer["answer"], answer["target"]), token_f1(
                answer["answer_ids"], answer["target_ids"], f1_formula
            )
        before = readout_of(reference)
        return exact_match(answer["answer"], before["answer"]), token_f1(
            answer["answer_ids"], before["answer_ids"], f1_formula
        )
    golds = list(question.answers) if reference is None else [reference]
    return normalized_em(result, golds, question.lang), normalized_f1(result, golds, question.lang, f1_formula)


# ---------------------------------------------------------------- the custom_dataset side


def f1_option(options: Mapping[str, Any]) -> str:
    formula = str(options.get("xke_f1", "harmonic"))
    if formula not in F1_FORMULAS:
        raise ValueError(f"xke_f1 must be one of {', '.join(F1_FORMULAS)}, got {formula!r}")
    return formula


def table_dataset(
    table: ParallelTable, edit_lang: str, langs: Sequence[str], options: Mapping[str, Any], label: str
) -> DatasetDict:
    """The task's docs from ``table``: edit in ``edit_lang``, ask in ``langs``; the join and subject-location
    counts go to every case's source, so that the results JSON reports them (``config.xke.data``)."""
    if not table.rows:
        raise RecordError(
            f"{label}: no record has a usable block in every language asked ({', '.join(langs)}); "
            f"left out per language: {table.report.as_dict(0)['dropped_per_lang']}"
        )
    protocol = str(options["xke_protocol"])
    requests, subjects = edit_requests(table, edit_lang)
    source = {
        "file": f"{label}, edit {edit_lang}",  # the run reports one entry per file label: one per edit language
        "sha256": table.sha256,
        "records": len(table.rows),
        "skipped_invalid": len(table.report.dropped_indices),
        "f1": f1_option(options),
        "protocol": protocol,
        "task_options": task_options_seen(dict(options)),
        "final_phase": wants_final_phase(dict(options)),
        XAVG: True,
        "benchmark": table.name,
        "edit_lang": edit_lang,
        "test_langs": list(langs),
        "files": [table.files[name] for name in sorted(table.files)],
        "join": table.report.as_dict(len(table.rows)),
        "subject_in_prompt": subjects,
    }
    if table.report.dropped_indices:
        log.warning("%s: %s", label, _dropped_line(table))
    if subjects["indices"]:
        log.warning(
            "%s: %d edit subjects (%s) are not verbatim in their prompt; located by casefold %d, fuzzy %d, "
            "whole prompt %d",
            label,
            len(subjects["indices"]),
            edit_lang,
            subjects["casefold"],
            subjects["fuzzy"],
            subjects["whole_prompt"],
        )
    docs = table_docs(table, requests, langs, protocol, source, table.name)
    return DatasetDict({"test": Dataset.from_list(docs)})


def _dropped_line(table: ParallelTable) -> str:
    per_lang = table.report.as_dict(len(table.rows))["dropped_per_lang"]
    detail = "; ".join(
        f"{lang}: {', '.join(f'{r} {n}' for r, n in reasons.items())}" for lang, reasons in per_lang.items()
    )
    return f"{len(table.report.dropped_indices)} of {table.report.records} records left out ({detail})"


def user_dataset(base: Path, options: Mapping[str, Any]) -> DatasetDict:
    """The docs of a user's task folder (``templates/multilingual_task``): ``xke_user_data`` describes the files
    (``parallel_data.load_user_table``), ``xke_edit_lang`` the edit language; ``xke_test_langs`` (default: every
    language of the data) and ``xke_data_file`` (another file or folder) as for the shipped benchmarks."""
    spec = options.get("xke_user_data")
    if not isinstance(spec, Mapping):
        raise ValueError("the task's metadata needs xke_user_data (see templates/multilingual_task/README.md)")
    table_langs = tuple(str(lang) for lang in spec.get("languages") or ())
    edit_lang = str(options.get("xke_edit_lang"))
    if edit_lang not in table_langs:
        raise ValueError(f"xke_edit_lang {edit_lang!r} is not among xke_user_data.languages {list(table_langs)}")
    langs = ordered_langs(
        edit_lang, parse_test_langs(options.get("xke_test_langs"), table_langs, table_langs), table_langs
    )
    table = load_user_table(dict(spec), langs, base, options.get("xke_data_file"))
    label = f"{table.name} ({', '.join(sorted(table.files))})"
    return table_dataset(table, edit_lang, langs, options, label)
