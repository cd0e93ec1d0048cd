"""MzsRE and BMIKE-53: their pair files, found like Bi-ZsRE's (``data.locate``), joined into parallel tables.

- **MzsRE** (ReMaKE, arXiv 2312.13040; ``weixuan-wang123/ReMaKE@975a9e9069``): 11 files
  ``mzsre/mzsre_test_duplicate_en<l>.json`` of 743 records ``{"en": R, "<l>": R}`` in the Bi-ZsRE schema. The English
  blocks are the same records in the same order in every file, so the files join *by index* into one table of 12
  languages; the join checks that (every file's English block equals the first file's) and refuses otherwise.
  Languages carry ISO 639-1 codes: the repository's ``cz`` (Czech) and ``du`` (Dutch) are ``cs`` and ``nl`` here.
- **BMIKE-53** (arXiv 2406.17764; ``ercong21/MultiKnow@6e3e245bf0``): per dataset (zsRE, CounterFact,
  WikiFactDiff) and language a file ``bmike53/<Dataset>/<prefix>_test_<lang>.json`` of records
  ``{"en": R, "<lang>": R}``, R = ``{case_id, subject, src, rephrase, [old], alt, loc, loc_ans, port, port_ans}``.
  The files join *by the English* ``case_id``; English is the ``en`` block (``*_test_en.json`` is a copy of the
  German file).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval_xke.data import DataFile, RecordError, locate, parse_json, sha256_of
from lm_eval_xke.data_pins import BMIKE53_SHA256, MZSRE_SHA256
from lm_eval_xke.parallel import ZSRE_FIELD_MAP, JoinError, ParallelTable, check_same_block, join

# ---------------------------------------------------------------- MzsRE

MZSRE_LANGS = ("en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh")
#: ISO 639-1 code -> the code in the ReMaKE file names and blocks
MZSRE_REPO_CODES = {"cs": "cz", "nl": "du"}
_MZSRE_URL = "https://raw.githubusercontent.com/weixuan-wang123/ReMaKE/975a9e9069/data/MzsRE/"


def mzsre_file(lang: str) -> DataFile:
    """The pinned pair file of English and ``lang`` (ISO code, not English)."""
    name = f"mzsre_test_duplicate_en{MZSRE_REPO_CODES.get(lang, lang)}.json"
    return DataFile(f"mzsre/{name}", sha256=MZSRE_SHA256[name], url=_MZSRE_URL + name)


def _records(spec: DataFile, path: str | os.PathLike | None) -> tuple[Path, list]:
    if path is not None and Path(path).expanduser().is_file():
        raise RecordError(
            f"xke_data_file={path} is a file, but this benchmark is read from several files: pass the folder that "
            f"holds {spec.relpath} (the shared-data layout) or the files themselves."
        )
    file = locate(spec, path)
    data = parse_json(file.read_bytes(), file)
    if not isinstance(data, list):
        raise RecordError(f"{file} must hold a JSON list of records {{'en': ..., '<lang>': ...}}.")
    return file, data


def load_mzsre(langs: Sequence[str], path: str | os.PathLike | None = None) -> ParallelTable:
    """The MzsRE table in ``langs`` (ISO codes), joined by index from the pair files those languages need."""
    others = [lang for lang in MZSRE_LANGS if lang in langs and lang != "en"] or ["de"]  # English alone: any file
    files: dict[str, dict[str, str]] = {}
    english: list | None = None
    blocks: dict[str, list] = {}
    for lang in others:
        file, data = _records(mzsre_file(lang), path)
        files[file.name] = {"file": file.name, "sha256": sha256_of(file)}
        if english is None:
            english, reference = [_block(item, "en") for item in data], file.name
        elif len(data) != len(english):
            raise JoinError(
                f"MzsRE files join by index, but {file.name} has {len(data)} records and {reference} {len(english)}: "
                "use the files of one release."
            )
        else:
            for index, item in enumerate(data):
                theirs, ours = _block(item, "en"), english[index]
                if isinstance(theirs, dict) and isinstance(ours, dict):
                    check_same_block(ours, theirs, f"MzsRE record {index}: the English block of {file.name}")
        blocks[lang] = [_block(item, MZSRE_REPO_CODES.get(lang, lang)) for item in data]
    blocks["en"] = english or []
    records = (
        (index, str(index), {lang: blocks[lang][index] for lang in langs if blocks[lang][index] is not None})
        for index in range(len(blocks["en"]))
    )
    return join("mzsre", records, [lang for lang in MZSRE_LANGS if lang in langs], ZSRE_FIELD_MAP, files)


def _block(item: Any, lang: str) -> Any:
    return item.get(lang) if isinstance(item, dict) else None


# ---------------------------------------------------------------- BMIKE-53

#: the 52 languages of BMIKE-53's ``lang.json`` and English
BMIKE53_LANGS = (
    "en", "af", "ar", "az", "be", "bg", "bn", "ca", "ceb", "cs", "cy", "da", "de", "el", "es", "et", "eu", "fa", "fi",
    "fr", "ga", "gl", "he", "hi", "hr", "hu", "hy", "id", "it", "ja", "ka", "ko", "la", "lt", "lv", "ms", "nl", "pl",
    "pt", "ro", "ru", "sk", "sl", "sq", "sr", "sv", "ta", "th", "tr", "uk", "ur", "vi", "zh",
)  # fmt: skip
#: task name -> (folder, file prefix); CounterFact and WikiFactDiff carry the pre-edit answer ``old``
BMIKE53_DATASETS = {
    "zsre": ("zsRE", "zsre"),
    "counterfact": ("CounterFact", "counterfact"),
    "wfd": ("WikiFactDiff", "wfd"),
}
_BMIKE53_URL = (
    "https://raw.githubusercontent.com/ercong21/MultiKnow/6e3e245bf0a17edaecfb4d71664efc1b5fb67906/data/BMIKE53/"
)
_BMIKE53_FIELDS = ("subject", "src", "rephrase", "alt", "loc", "loc_ans", "port", "port_ans")


def bmike53_file(dataset: str, lang: str) -> DataFile:
    """The pinned file of ``dataset`` (zsre | counterfact | wfd) and ``lang``."""
    folder, prefix = BMIKE53_DATASETS[dataset]
    rel = f"{folder}/{prefix}_test_{lang}.json"
    return DataFile(f"bmike53/{rel}", sha256=BMIKE53_SHA256[rel], url=_BMIKE53_URL + rel)


def bmike53_field_map(dataset: str) -> dict[str, str]:
    fields = {name: name for name in _BMIKE53_FIELDS}
    return fields if dataset == "zsre" else {**fields, "old": "old"}


def load_bmike53(dataset: str, langs: Sequence[str], path: str | os.PathLike | None = None) -> ParallelTable:
    """The BMIKE-53 ``dataset`` table in ``langs``, joined by the English ``case_id`` of each language's file.

    The English table (order, blocks) is the first file's; a record of a later file whose English block differs
    from it refuses the join, and one whose ``case_id`` it lacks is counted under that language.
    """
    if dataset not in BMIKE53_DATASETS:
        raise ValueError(f"BMIKE-53 dataset must be one of {', '.join(BMIKE53_DATASETS)}, got {dataset!r}")
    others = [lang for lang in BMIKE53_LANGS if lang in langs and lang != "en"] or ["en"]
    files: dict[str, dict[str, str]] = {}
    order: list[tuple[int, str]] = []
    english: dict[str, Any] = {}
    by_lang: dict[str, dict[str, Any]] = {}
    unmatched: dict[str, int] = {}
    for lang in others:
        file, data = _records(bmike53_file(dataset, lang), path)
        files[file.name] = {"file": file.name, "sha256": sha256_of(file)}
        first = not order
        by_lang[lang] = {}
        for index, item in enumerate(data):
            en = _block(item, "en")
            key = str(en.get("case_id")) if isinstance(en, dict) and "case_id" in en else f"#{index}"
            if first:
                order.append((index, key))
                english[key] = en
            elif key not in english:
                unmatched[lang] = unmatched.get(lang, 0) + 1
                continue
            elif isinstance(en, dict) and isinstance(english[key], dict):
                check_same_block(
                    english[key], en, f"BMIKE-53 {dataset} case_id {key}: the English block of {file.name}"
                )
            by_lang[lang][key] = _block(item, lang)
    by_lang["en"] = english
    records = (
        (index, key, {lang: by_lang[lang][key] for lang in langs if by_lang[lang].get(key) is not None})
        for index, key in order
    )
    table = join(
        f"bmike53-{dataset}",
        records,
        [lang for lang in BMIKE53_LANGS if lang in langs],
        bmike53_field_map(dataset),
        files,
    )
    for lang, count in unmatched.items():
        table.report.dropped.setdefault(lang, Counter())["case_id not in the English table"] += count
    return table


# ---------------------------------------------------------------- users' own files

USER_SPEC_KEYS = ("name", "languages", "files", "align", "fields")


def load_user_table(
    spec: dict[str, Any],
    langs: Sequence[str] | None = None,
    base: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
) -> ParallelTable:
    """A user's multilingual edit data as a parallel table, described by ``spec`` (a task's ``xke_user_data``).

    ``spec``: ``name``; ``languages`` (codes, table order); ``files``: one file of records with a block per
    language (``{"en": {...}, "de": {...}}``), or ``{lang: file}`` with one file of flat records per language;
    ``align``: ``index`` (default) or the name of an id field present in every per-language record; ``fields``:
    canonical name -> the record's field (dots for nested keys), e.g. ``{src: prompt, alt: target_new,
    rephrase: rephrase_prompt}``; ``subject``, ``src`` and ``alt`` are required, other roles are asked when their
    fields are mapped. Relative file names resolve against ``path`` (``xke_data_file``: a file replaces a single
    ``files``, a folder holds the files) else ``base`` (the task folder). JSON lists and JSON lines are read.
    """
    unknown = sorted(set(spec) - set(USER_SPEC_KEYS))
    if unknown:
        raise ValueError(f"xke_user_data: unknown key(s) {', '.join(unknown)}; known: {', '.join(USER_SPEC_KEYS)}")
    for key in ("name", "languages", "files", "fields"):
        if key not in spec:
            raise ValueError(f"xke_user_data: '{key}' is missing (see templates/multilingual_task/README.md)")
    table_langs = [str(lang) for lang in spec["languages"]]
    langs = [lang for lang in table_langs if langs is None or lang in langs]
    fields = {str(k): str(v) for k, v in dict(spec["fields"]).items()}
    align = str(spec.get("align", "index"))
    files_spec = spec["files"]
    if isinstance(files_spec, (str, os.PathLike)):
        file = _user_path(files_spec, base, path, single=True)
        items = _user_records(file)
        info = {file.name: {"file": file.name, "sha256": sha256_of(file)}}
        records = ((i, str(i), item if isinstance(item, dict) else {}) for i, item in enumerate(items))
        return join(str(spec["name"]), records, langs, fields, info)
    if not isinstance(files_spec, dict):
        raise ValueError("xke_user_data.files must be a file name, or a mapping language -> file name")
    missing = [lang for lang in langs if lang not in files_spec]
    if missing:
        raise ValueError(f"xke_user_data.files has no file for language(s) {', '.join(missing)}")
    per_lang: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, str]] = {}
    order: list[tuple[int, str]] = []
    for lang in langs:
        file = _user_path(files_spec[lang], base, path, single=False)
        info[file.name] = {"file": file.name, "sha256": sha256_of(file)}
        keyed: dict[str, Any] = {}
        for index, item in enumerate(_user_records(file)):
            key = str(index) if align == "index" else _user_key(item, align, file, index)
            keyed[key] = item
            if lang == langs[0]:
                order.append((index, key))
        per_lang[lang] = keyed
    records = ((i, key, {lang: per_lang[lang][key] for lang in langs if key in per_lang[lang]}) for i, key in order)
    return join(str(spec["name"]), records, langs, fields, info)


def _user_key(item: Any, align: str, file: Path, index: int) -> str:
    if not isinstance(item, dict) or item.get(align) in (None, ""):
        raise RecordError(f"{file} record {index}: the id field {align!r} (xke_user_data.align) is missing")
    return str(item[align])


def _user_path(name: Any, base: Any, path: Any, single: bool) -> Path:
    given = Path(path).expanduser() if path else None
    if given is not None and given.is_file():
        if single:
            return given
        raise RecordError(f"xke_data_file={path} is a file, but this task reads one file per language: pass a folder")
    candidate = Path(str(name)).expanduser()
    for root in ([given] if given is not None else []) + ([Path(base)] if base else []) + [Path.cwd()]:
        if not candidate.is_absolute() and (root / candidate).is_file():
            return root / candidate
    if candidate.is_file():
        return candidate
    raise RecordError(f"xke_user_data: data file {name} not found (looked in xke_data_file, the task folder, .)")


def _user_records(file: Path) -> list:
    raw = file.read_bytes()
    if file.suffix == ".jsonl":
        lines = [line for line in raw.decode("utf-8-sig").splitlines() if line.strip()]
        return [parse_json(line.encode("utf-8"), Path(f"{file} line {n + 1}")) for n, line in enumerate(lines)]
    data = parse_json(raw, file)
    if not isinstance(data, list):
        raise RecordError(f"{file} must hold a JSON list of records (or be a .jsonl file of one record per line)")
    return data
