"""MzsRE: the 11 pair files joined by index into one 12-language table -> edit cases; scoring is the shared one.

``mzsre_<l>`` edits in ``l`` and asks in every MzsRE language (``xke_test_langs`` narrows it); question order and
metrics are those of ``lm_eval_xke.parallel_cases`` (the Bi-ZsRE ones, plus ``<role>_xavg_<em|f1>``).
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from lm_eval_xke.parallel_cases import ordered_langs, parse_test_langs, process_results, table_dataset
from lm_eval_xke.parallel_data import MZSRE_LANGS, load_mzsre

__all__ = ["load_dataset", "process_results"]


def load_dataset(**options: Any) -> DatasetDict:
    """``custom_dataset`` loader of ``mzsre_<l>``.

    Options: ``xke_edit_lang``, ``xke_protocol`` (fixed by the task YAML); ``xke_test_langs`` (``all`` by default,
    or ``|``-separated ISO codes; the edit language is always asked); ``xke_data_file`` (a folder holding
    ``mzsre/`` or the pair files); ``xke_f1``.
    """
    edit_lang = str(options["xke_edit_lang"])
    if edit_lang not in MZSRE_LANGS:
        raise ValueError(f"xke_edit_lang must be one of {' '.join(MZSRE_LANGS)}, got {edit_lang!r}")
    test = parse_test_langs(options.get("xke_test_langs"), MZSRE_LANGS, MZSRE_LANGS)
    langs = ordered_langs(edit_lang, test, MZSRE_LANGS)
    table = load_mzsre(langs, options.get("xke_data_file"))
    return table_dataset(table, edit_lang, langs, options, f"mzsre ({len(table.files)} pair files joined by index)")
