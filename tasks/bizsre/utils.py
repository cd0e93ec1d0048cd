"""Bi-ZsRE: records -> edit cases (loader), and per-case scoring (process_results).

Questions of one case, in this order (``Instance.idx``): reliability in the edit language and in the
other language (``src``/``alt``), generality en/zh (``rephrase``/``alt``), locality en/zh asked before
the edit and after it (``loc`` read out along ``loc_ans``; scored post vs pre), portability en/zh
(``portability["New Question"]``/``["New Answer"]``). Under ``edit_mode=sequential`` every post question is
asked once more after the run's last edit and scored as ``<role>_<lang>_<em|f1>_final``.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict

from lm_eval_xke.cases import task_options_seen, wants_final_phase
from lm_eval_xke.data import BIZSRE_TEST, flag_option, load_bizsre, locate
from lm_eval_xke.parallel import ZSRE_FIELD_MAP, join
from lm_eval_xke.parallel_cases import edit_requests, f1_option, process_results, table_docs

LANGS = ("en", "zh")
ROLES = ("reliability", "generality", "locality", "portability")
METRICS = tuple(f"{role}_{lang}_{m}" for role in ROLES for lang in LANGS for m in ("em", "f1"))
__all__ = ["load_dataset", "process_results"]


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
    f1_formula = f1_option(options)
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
    # validated records always have both blocks and the subject inside its prompt: the join keeps them all
    records = ((index, str(index), record) for index, record in data.records)
    table = join("bizsre", records, LANGS, ZSRE_FIELD_MAP, {path.name: {"file": path.name, "sha256": data.sha256}})
    requests, _ = edit_requests(table, edit_lang)
    docs = table_docs(table, requests, LANGS, protocol, source, "bizsre")
    return DatasetDict({"test": Dataset.from_list(docs)})
