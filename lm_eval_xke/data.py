"""Finding, downloading, verifying and validating benchmark data files.

A data file is described by a ``DataFile``: its path relative to a data folder (the same layout as the shared
data folder, e.g. ``bizsre/bizsre_test.json``), the sha256 of the exact file we expect, and optionally a pinned
public URL plus a ``repair`` function that turns the downloaded bytes into that file.

``locate`` looks, in order, at an explicit path, at ``$XKE_DATA_DIR/<relpath>``, at the user cache
``$XKE_CACHE_DIR/data/<relpath>`` (default cache ``~/.cache/lm_eval_xke``), and finally downloads the file into
the cache, accepting it only if its sha256 matches the pinned one. Files found locally are not rejected for a
different sha256 (you may evaluate your own version); the loaders report the sha256 of what they read.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

DATA_ENV = "XKE_DATA_DIR"
CACHE_ENV = "XKE_CACHE_DIR"
DEFAULT_CACHE = Path("~/.cache/lm_eval_xke")
DOWNLOAD_TIMEOUT_S = 20.0

SKIP_HINT = (
    "Fix the record, or pass xke_skip_invalid=true to skip invalid records (the count is reported in the results)."
)
#: Longest accepted text field: 12x the longest of Bi-ZsRE and MLaKE (319 characters). A longer one is a corrupt
#: record, which the model would otherwise truncate silently to its context, or run out of memory on.
MAX_FIELD_CHARS = 4000


class DataNotFoundError(FileNotFoundError):
    """A data file is in none of the places ``locate`` looks, and could not be downloaded."""


@dataclass(frozen=True)
class DataFile:
    """A benchmark file: where it lives in a data folder, what it must hash to, and where to download it."""

    relpath: str
    sha256: str
    url: str | None = None
    repair: Callable[[bytes], bytes] | None = None

    @property
    def name(self) -> str:
        return Path(self.relpath).name


# ---------------------------------------------------------------- Bi-ZsRE test set

_BIZSRE_REPAIR_INDEX = 506
_BIZSRE_REPAIR_SUBJECT = "Glass Candy"
# Upstream zh.loc reads "尼古拉斯" (a stray name); this is the translation of the record's English loc question.
_BIZSRE_REPAIR_ZH_LOC = "函数的极限何时不存在"


def canonical_json_bytes(data: Any) -> bytes:
    """The byte layout of the shared data files: 4-space indent, non-ASCII kept, UTF-8."""
    return json.dumps(data, indent=4, ensure_ascii=False).encode("utf-8")


def repair_bizsre_test(raw: bytes) -> bytes:
    """Turn the upstream X_KDE ``bizsre_test.json`` into ours: fix record 506's zh.loc, dump canonically."""
    data = json.loads(raw.decode("utf-8"))
    i = _BIZSRE_REPAIR_INDEX
    if not isinstance(data, list) or len(data) <= i:
        raise ValueError(f"expected a JSON list of more than {i} Bi-ZsRE records; the upstream file has changed")
    record = data[i]
    en, zh = (record.get("en"), record.get("zh")) if isinstance(record, dict) else (None, None)
    subject = en.get("subject") if isinstance(en, dict) else None
    if subject != _BIZSRE_REPAIR_SUBJECT or not isinstance(zh, dict):
        raise ValueError(
            f"record {i} (en): subject is {subject!r}, expected {_BIZSRE_REPAIR_SUBJECT!r}; "
            "the upstream file has changed"
        )
    zh["loc"] = _BIZSRE_REPAIR_ZH_LOC
    return canonical_json_bytes(data)


BIZSRE_TEST = DataFile(
    "bizsre/bizsre_test.json",
    sha256="01620cf1c9e4209e5f8d59b47d72b5d8ab80f9e948132bd8d17ea901c8935ff6",
    url=(
        "https://raw.githubusercontent.com/YukinoshitaKaren/X_KDE/"
        "d2ff78a666ba0c03bd1f95b2e21cbe67b482dc87/eval/data/bizsre_test.json"
    ),
    repair=repair_bizsre_test,
)


# ---------------------------------------------------------------- locating files


def cache_dir() -> Path:
    """The user cache folder: ``$XKE_CACHE_DIR``, else ``~/.cache/lm_eval_xke``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Create ``path`` by ``write(temporary_name)`` on a file beside it, then rename that into place: a reader, or a run
    killed half-way, never sees a partial file (``os.replace`` is atomic within a folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def cache_path(spec: DataFile) -> Path:
    """Where ``spec`` lives (or will be downloaded to) in the user cache."""
    return cache_dir() / "data" / spec.relpath


@lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, memoised by (path, mtime, size) so unchanged files are hashed once."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return _sha256_cached(str(resolved), st.st_mtime_ns, st.st_size)


def _explicit(spec: DataFile, path: str | os.PathLike) -> Path:
    """Resolve a user-given file, or folder holding ``relpath`` (or just the file name); never falls through."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if given.is_dir():
        candidates = [given / spec.relpath, given / spec.name]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        tried = " or ".join(str(c) for c in candidates)
        raise DataNotFoundError(f"{spec.name} not found in the given folder {given}: looked for {tried}.")
    raise DataNotFoundError(
        f"the given data path {given} does not exist. Pass the path of {spec.name}, "
        f"or of a folder holding {spec.relpath}."
    )


def _fetch(url: str, timeout: float) -> bytes:
    """Download ``url`` (tests replace this function, so they never touch the network)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _download(spec: DataFile, url: str, target: Path) -> None:
    """Download, repair and sha-check ``spec``, then move it atomically to ``target``; raise on any failure."""
    raw = _fetch(url, DOWNLOAD_TIMEOUT_S)
    content = spec.repair(raw) if spec.repair else raw
    got = hashlib.sha256(content).hexdigest()
    if got != spec.sha256:
        raise ValueError(f"downloaded file has sha256 {got}, expected {spec.sha256}; it was not saved")
    write_atomic(target, lambda tmp: Path(tmp).write_bytes(content))


def locate(spec: DataFile, path: str | os.PathLike | None = None) -> Path:
    """Find ``spec``: explicit ``path`` > ``$XKE_DATA_DIR/<relpath>`` > user cache > download into the cache."""
    if path is not None:
        return _explicit(spec, path)
    tried: list[str] = []
    env_dir = os.environ.get(DATA_ENV)
    if env_dir:
        candidate = Path(env_dir).expanduser() / spec.relpath
        if candidate.is_file():
            return candidate
        tried.append(f"{DATA_ENV}: {candidate} (missing)")
    else:
        tried.append(f"{DATA_ENV}: not set")
    cached = cache_path(spec)
    if cached.is_file():
        return cached
    tried.append(f"cache: {cached} (missing)")
    if spec.url is None:
        tried.append("download: no public URL is pinned for this file")
    else:
        try:
            _download(spec, spec.url, cached)
            return cached
        except (OSError, ValueError, http.client.HTTPException) as err:  # network, repair or sha failures
            tried.append(f"download: {spec.url} failed ({type(err).__name__}: {err})")
    raise DataNotFoundError(_not_found_message(spec, tried))


def _not_found_message(spec: DataFile, tried: list[str]) -> str:
    places = "\n".join(f"  - {t}" for t in tried)
    return (
        f"could not find {spec.relpath}. Places tried:\n{places}\n"
        f"To fix, do one of:\n"
        f"  - set {DATA_ENV} to a folder with the same layout as the shared data folder, "
        f"so that ${DATA_ENV}/{spec.relpath} is the file;\n"
        f"  - put the file at {cache_path(spec)};\n"
        f"  - pass the file's path explicitly.\n"
        f"The expected file has sha256 {spec.sha256}."
    )


# ---------------------------------------------------------------- Bi-ZsRE loading and validation

BIZSRE_LANGS = ("en", "zh")
BIZSRE_FIELDS = ("subject", "src", "rephrase", "alt", "loc", "loc_ans")
PORTABILITY_FIELDS = ("New Question", "New Answer")


@dataclass(frozen=True)
class RecordProblem:
    """What is wrong with one record; ``lang`` and ``field`` are None when the problem is not that specific."""

    index: int
    lang: str | None
    field: str | None
    problem: str

    def describe(self, file_name: str) -> str:
        """E.g. "bizsre_test.json record 12 (zh): field 'alt' is empty"."""
        where = f"{file_name} record {self.index}" + (f" ({self.lang})" if self.lang else "")
        return f"{where}: {self.problem}"


class RecordError(ValueError):
    """A data file, or one of its records, is not usable; the message names file, record, language and field."""

    def __init__(self, message: str, problem: RecordProblem | None = None):
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class BizsreData:
    """Validated Bi-ZsRE records as (original index, record), the skipped records' problems, and the sha256."""

    records: list[tuple[int, dict]]
    skipped: list[RecordProblem]
    sha256: str
    path: Path | None = field(default=None)


_JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}


def _type_name(value: Any) -> str:
    """JSON-flavoured name of a value's type, for error messages."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _string_problem(value: Any, name: str) -> str | None:
    """Why ``value`` is not a usable non-empty string field, or None if it is."""
    if not isinstance(value, str):
        return f"field {name!r} must be a string, got {_type_name(value)}"
    if not value.strip():
        return f"field {name!r} is empty"
    if len(value) > MAX_FIELD_CHARS:
        return f"field {name!r} is {len(value):,} characters long; a question or answer may have {MAX_FIELD_CHARS:,}"
    return None


def _string_list_problem(value: Any, name: str) -> str | None:
    """Why ``value`` is not a list of usable strings (possibly empty), or None if it is."""
    if not isinstance(value, list):
        return f"field {name!r} must be a list of strings, got {_type_name(value)}"
    problems = (_string_problem(item, f"{name}[{i}]") for i, item in enumerate(value))
    return next((p for p in problems if p), None)


def _block_problems(index: int, lang: str, block: Any) -> list[RecordProblem]:
    """Problems of one language block ``{subject, src, ..., portability}``."""
    if not isinstance(block, dict):
        return [RecordProblem(index, lang, None, f"the {lang!r} block must be an object, got {_type_name(block)}")]
    found: list[RecordProblem] = []
    for name in BIZSRE_FIELDS:
        problem = f"field {name!r} is missing" if name not in block else _string_problem(block[name], name)
        if problem:
            found.append(RecordProblem(index, lang, name, problem))
    if "portability" in block:
        found += _portability_problems(index, lang, block["portability"])
    else:
        found.append(RecordProblem(index, lang, "portability", "field 'portability' is missing"))
    subject, src = block.get("subject"), block.get("src")
    if not found and subject not in src:
        found.append(
            RecordProblem(
                index,
                lang,
                "subject",
                f"subject {subject!r} does not occur in 'src' {src!r} (locate-then-edit editors such as ROME "
                "and MEMIT need the subject inside the edit prompt)",
            )
        )
    return found


def _portability_problems(index: int, lang: str, value: Any) -> list[RecordProblem]:
    if not isinstance(value, dict):
        kinds = " and ".join(repr(k) for k in PORTABILITY_FIELDS)
        problem = f"field 'portability' must be an object with {kinds}, got {_type_name(value)}"
        return [RecordProblem(index, lang, "portability", problem)]
    found = []
    for key in PORTABILITY_FIELDS:
        name = f"portability.{key}"
        problem = f"field {name!r} is missing" if key not in value else _string_problem(value[key], name)
        if problem:
            found.append(RecordProblem(index, lang, name, problem))
    return found


def bizsre_record_problems(index: int, item: Any) -> list[RecordProblem]:
    """Every problem of one Bi-ZsRE item ``{"en": R, "zh": R}``; empty if it is valid."""
    if not isinstance(item, dict):
        langs = " and ".join(repr(lang) for lang in BIZSRE_LANGS)
        return [RecordProblem(index, None, None, f"expected an object with keys {langs}, got {_type_name(item)}")]
    found: list[RecordProblem] = []
    for lang in BIZSRE_LANGS:
        if lang not in item:
            found.append(RecordProblem(index, lang, None, f"the {lang!r} block is missing"))
        else:
            found += _block_problems(index, lang, item[lang])
    return found


def parse_json(raw: bytes, path: Path) -> Any:
    """Parse the UTF-8 JSON bytes of ``path``; bad bytes or bad JSON raise ``RecordError`` naming file and position."""
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark some editors add
    except UnicodeDecodeError as err:
        raise RecordError(
            f"{path} is not UTF-8 text: byte {err.start} ({raw[err.start : err.start + 1]!r}) {err.reason}. "
            "Save the file as UTF-8, or re-download it."
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        # the parser reached the end inside a string, or the text stopped before the JSON did
        ends_early = err.msg.startswith("Unterminated string") or err.pos >= len(text.rstrip())
        truncated = " The file ends early: it is probably truncated." if ends_early else ""
        raise RecordError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno} (character {err.pos})."
            f"{truncated} Re-download the file or fix the JSON."
        ) from None


def load_bizsre(path: str | os.PathLike | None = None, skip_invalid: bool = False) -> BizsreData:
    """Load and validate ``bizsre_test.json`` (``path`` as for ``locate``); invalid records raise or are skipped."""
    file = locate(BIZSRE_TEST, path)
    raw = file.read_bytes()
    shape = 'Bi-ZsRE records {"en": ..., "zh": ...}'
    records, skipped = validated_records(file, parse_json(raw, file), shape, bizsre_record_problems, skip_invalid)
    return BizsreData(records=records, skipped=skipped, sha256=hashlib.sha256(raw).hexdigest(), path=file)


def flag_option(options: Mapping[str, Any], name: str) -> bool:
    """A true/false task option such as ``xke_skip_invalid`` (lm-eval turns ``true`` model_args into bools, but YAML
    metadata and Python callers may pass strings); anything else is an error rather than a silent false."""
    value = options.get(name, False)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def validated_records(
    file: Path,
    data: Any,
    shape: str,
    problems_of: Callable[[int, Any], list[RecordProblem]],
    skip_invalid: bool,
) -> tuple[list[tuple[int, dict]], list[RecordProblem]]:
    """The valid records of a file's parsed JSON list as (index, record), and the first problem of each skipped one.

    An invalid record raises ``RecordError`` (naming file, record, language and field) unless ``skip_invalid``; a
    file that is not a list, or has no valid record, always raises.
    """
    if not isinstance(data, list):
        raise RecordError(
            f"{file} must hold a JSON list of {shape}, got {_type_name(data)}. Check that this is the right file."
        )
    records: list[tuple[int, dict]] = []
    skipped: list[RecordProblem] = []
    for index, item in enumerate(data):
        problems = problems_of(index, item)
        if not problems:
            records.append((index, item))
        elif skip_invalid:
            skipped.append(problems[0])
        else:
            raise _record_error(file.name, problems)
    if not records:
        raise RecordError(f"{file} holds no valid {shape} ({len(skipped)} invalid, {len(data)} in all).")
    return records, skipped


def _record_error(file_name: str, problems: list[RecordProblem]) -> RecordError:
    first = problems[0]
    more = f" (and {len(problems) - 1} more problem(s) in this record)" if len(problems) > 1 else ""
    return RecordError(f"{first.describe(file_name)}{more}. {SKIP_HINT}", first)


# ---------------------------------------------------------------- MLaKE (Hi-archers/MLaKE)

MLAKE_LANGS = ("en", "zh", "ja", "fr", "de")
_MLAKE_RAW = "https://raw.githubusercontent.com/Hi-archers/MLaKE"
_MLAKE_QA_COMMIT = "40b6a3cfde908acdafee1cdc2e241f8c0eb9687b"  # HEAD: free-form QA files
_MLAKE_MCQA_COMMIT = "49412a9997a7f9bea4531b72c7a1b947a7da4c6c"  # last commit with the MCQA files
_MLAKE_SHA256 = {
    "single_hop/qa/en_qa.json": "d501aecd7e7e02051a78ec935dc7ced4bd5ab3110f2d14717242e694b3a03218",
    "single_hop/qa/zh_qa.json": "6477ddc75a4cc4eddba899cea449a718ccb6073ab7965223ee34c130d8d40d36",
    "single_hop/qa/ja_qa.json": "e0a24c164a42e4a7dfa595599d77b03bed4b0f88200f49a293be379c8d19ddbc",
    "single_hop/qa/fr_qa.json": "5a6648dbdd159c03a485d73d25aa0c0e00962c4772bf344323d502630e020f69",
    "single_hop/qa/de_qa.json": "f65580a778e7eefcabb265a404dd0bdb803ddbd8f44fc046347709f52cbcc25f",
    "multi_hop/qa/new_en_qa.json": "45c5452c763b94ba9e50a5005c2576b0f8a3e584f81794e18c38d1e760919eff",
    "multi_hop/qa/new_zh_qa.json": "88d2e74b7c4f8fc3c06859e6f25a4f7aa6a9e85dcacba1c59fdc66ac471d2bdc",
    "multi_hop/qa/new_ja_qa.json": "f14676479173cb0055749c8d305b5108e341be83638c4a6c404e7248629c5c9f",
    "multi_hop/qa/new_fr_qa.json": "5636bbbbf5f1deb8e3066c17bd4b411aed7538f8bf10b417f4b64939f7978995",
    "multi_hop/qa/new_de_qa.json": "fa70aafd46531402c45561c47320b300eca6f7768e59d7dd0a570bbea3c52452",
    "single_hop/mcqa/en_mcqa.json": "dcf6fe1c1447abde756c056842acd957550d4f468304f9c55b10e2fa2f639494",
    "single_hop/mcqa/zh_mcqa.json": "abb20544677e62a1b846abefe37ac9bb16c3e5fd4b6bc02f1a742bab5248fe8a",
    "single_hop/mcqa/ja_mcqa.json": "9ee60d673eec7d06949a6604d523429d9bbef3c05be301d61d03e15bd7cf7388",
    "single_hop/mcqa/fr_mcqa.json": "c0ea2f1d22991b7fac4d3a6a03ea77deb1c109ce9cd02ba5e8e8374ffaa6a7b0",
    "single_hop/mcqa/de_mcqa.json": "e70ca8ef6790186149b0cdc4ef0d07befd15910879dab4d32bea68a474986e8a",
}
#: Fields every record of a kind must have as non-empty strings, and as lists of strings.
MLAKE_FIELDS = {
    "single_qa": (
        ("question", "o_prompt", "o_answer", "e_prompt", "e_answer"),
        ("o_answer_aliases", "e_answer_aliases"),
    ),
    "multi_qa": (("question", "e_prompt", "e_answer"), ("e_answer_aliases",)),
    "single_mcqa": (("question", "o_prompt", "o_answer", "e_prompt", "e_answer"), ("options",)),
}
MCQA_LETTERS = ("A", "B", "C", "D")


def _mlake_relpath(kind: str, lang: str) -> str:
    if lang not in MLAKE_LANGS:
        raise ValueError(f"MLaKE language must be one of {', '.join(MLAKE_LANGS)}, got {lang!r}")
    return {
        "single_qa": f"single_hop/qa/{lang}_qa.json",
        "multi_qa": f"multi_hop/qa/new_{lang}_qa.json",
        "single_mcqa": f"single_hop/mcqa/{lang}_mcqa.json",
    }[kind]


def mlake_file(kind: str, lang: str) -> DataFile:
    """The pinned MLaKE file of ``kind`` (single_qa | multi_qa | single_mcqa) and ``lang``."""
    rel = _mlake_relpath(kind, lang)
    # upstream paths: QA files at HEAD drop the qa/ folder; MCQA files only exist at the older commit
    upstream = f"{_MLAKE_MCQA_COMMIT}/dataset/{rel}" if kind == "single_mcqa" else f"{_MLAKE_QA_COMMIT}/dataset/{rel}"
    if kind != "single_mcqa":
        upstream = upstream.replace("/qa/", "/", 1)
    return DataFile(f"mlake/{rel}", sha256=_MLAKE_SHA256[rel], url=f"{_MLAKE_RAW}/{upstream}")


@dataclass(frozen=True)
class MlakeData:
    """Validated MLaKE records of one file as (original index, record), skipped problems, sha256 and path."""

    records: list[tuple[int, dict]]
    skipped: list[RecordProblem]
    sha256: str
    path: Path

    @property
    def size(self) -> int:
        """Records in the file, valid or not."""
        return len(self.records) + len(self.skipped)


def mlake_record_problems(index: int, item: Any, kind: str, lang: str) -> list[RecordProblem]:
    """Every problem of one MLaKE record of ``kind``; empty if it is valid."""
    if not isinstance(item, dict):
        return [RecordProblem(index, lang, None, f"expected an object, got {_type_name(item)}")]
    strings, lists = MLAKE_FIELDS[kind]
    found: list[RecordProblem] = []
    for names, problem_of in ((strings, _string_problem), (lists, _string_list_problem)):
        for name in names:
            problem = f"field {name!r} is missing" if name not in item else problem_of(item[name], name)
            if problem:
                found.append(RecordProblem(index, lang, name, problem))
    if kind == "single_mcqa" and not found:
        if len(item["options"]) != len(MCQA_LETTERS):
            found.append(RecordProblem(index, lang, "options", f"expected 4 options, got {len(item['options'])}"))
        for name in ("o_answer", "e_answer"):
            if item[name] not in MCQA_LETTERS:
                found.append(RecordProblem(index, lang, name, f"field {name!r} must be a letter A-D"))
    return found


def load_mlake(kind: str, lang: str, path: str | os.PathLike | None = None, skip_invalid: bool = False) -> MlakeData:
    """Load and validate one MLaKE file (``path`` as for ``locate``: the file or a shared-data-layout folder)."""
    spec = mlake_file(kind, lang)
    file = locate(spec, path)
    raw = file.read_bytes()

    def problems_of(index: int, item: Any) -> list[RecordProblem]:
        return mlake_record_problems(index, item, kind, lang)

    records, skipped = validated_records(file, parse_json(raw, file), "MLaKE records", problems_of, skip_invalid)
    return MlakeData(records=records, skipped=skipped, sha256=hashlib.sha256(raw).hexdigest(), path=file)
