"""BMIKE-53: a dataset's language files joined by the English ``case_id`` -> edit cases; the shared scoring.

``bmike53_<dataset>_<lang>`` edits in English and asks in English and ``<lang>``, as the paper runs it;
``xke_reverse=true`` edits in ``<lang>`` instead, and ``xke_test_langs`` asks in any set of the 53 languages
(``all``) from the same edit: one row of the transfer matrix. CounterFact and WikiFactDiff add ``old_answer_*``.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from lm_eval_xke.data import flag_option
from lm_eval_xke.parallel_cases import ordered_langs, parse_test_langs, process_results, table_dataset
from lm_eval_xke.parallel_data import BMIKE53_DATASETS, BMIKE53_LANGS, load_bmike53

__all__ = ["load_dataset", "process_results"]


def load_dataset(**options: Any) -> DatasetDict:
    """``custom_dataset`` loader of ``bmike53_<dataset>_<lang>``.

    Options: ``xke_bmike53_dataset``, ``xke_bmike53_lang``, ``xke_protocol`` (fixed by the task YAML);
    ``xke_reverse`` (edit in ``<lang>``, not English); ``xke_test_langs`` (``all`` or ``|``-separated codes; default
    English and ``<lang>``; the edit language is always asked); ``xke_data_file`` (a folder holding ``bmike53/``);
    ``xke_f1``.
    """
    dataset, lang = str(options["xke_bmike53_dataset"]), str(options["xke_bmike53_lang"])
    if dataset not in BMIKE53_DATASETS or lang not in BMIKE53_LANGS:
        raise ValueError(f"no BMIKE-53 task for dataset {dataset!r} and language {lang!r}")
    edit_lang = lang if flag_option(options, "xke_reverse") else "en"
    test = parse_test_langs(options.get("xke_test_langs"), BMIKE53_LANGS, ("en", lang))
    langs = ordered_langs(edit_lang, test, BMIKE53_LANGS)
    table = load_bmike53(dataset, langs, options.get("xke_data_file"))
    label = f"bmike53/{BMIKE53_DATASETS[dataset][0]} ({len(table.files)} language file(s) joined by case_id)"
    return table_dataset(table, edit_lang, langs, options, label)
