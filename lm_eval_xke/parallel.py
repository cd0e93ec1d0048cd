"""Parallel tables: a multilingual edit benchmark as records with one block per language.

Cross-lingual benchmarks ship pair files (``{"en": R, "de": R}``, ``{"en": R, "zh": R}``, ...) cut from one table;
:func:`join` puts them back together, so one edit can be asked in every language at once. A block is read into
the *canonical fields* below through a field map (``canonical -> path in the source block``, dots for nested keys:
Bi-ZsRE's ``portability.New Question``); the roles a table reports are the ones whose fields the map provides.

Real data is messy: a language block can be missing, a field empty, a translated subject absent from its prompt.
The join never crashes on a record and never drops one silently: a record that lacks a usable block in a language
the run needs is left out and counted under that language with the reason (``JoinReport``); a subject that is not
in its edit prompt is located by :func:`locate_subject` and the fallback is counted by the task loaders.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lm_eval_xke.data import MAX_FIELD_CHARS

#: canonical block fields: the edit (subject, src, alt) and the questions of each role
EDIT_FIELDS = ("subject", "src", "alt")
#: role -> (question field, answer field); ``old_answer`` asks the edit prompt and expects the pre-edit answer
ROLE_FIELDS: dict[str, tuple[str, str]] = {
    "reliability": ("src", "alt"),
    "generality": ("rephrase", "alt"),
    "locality": ("loc", "loc_ans"),
    "portability": ("port", "port_ans"),
    "old_answer": ("src", "old"),
}
CANONICAL_FIELDS = ("subject", "src", "alt", "rephrase", "loc", "loc_ans", "port", "port_ans", "old")
#: the zsRE schema of Bi-ZsRE and MzsRE blocks
ZSRE_FIELD_MAP = {
    "subject": "subject",
    "src": "src",
    "rephrase": "rephrase",
    "alt": "alt",
    "loc": "loc",
    "loc_ans": "loc_ans",
    "port": "portability.New Question",
    "port_ans": "portability.New Answer",
}
#: scripts written without spaces between words: a subject is searched for character by character
UNSPACED_LANGS = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo"})
#: least ``difflib`` ratio for a span to count as the subject's inflected or re-spelled form
FUZZY_MIN_RATIO = 0.5


@dataclass(frozen=True)
class ParallelRow:
    """One record of the table: its position in the benchmark (``index``), its join key, and a block per language."""

    index: int
    key: str
    blocks: dict[str, dict[str, str]]


@dataclass
class JoinReport:
    """What a join kept and left out, per language: ``dropped[lang][reason]`` counts records."""

    records: int = 0
    dropped: dict[str, Counter] = field(default_factory=dict)
    dropped_indices: list[int] = field(default_factory=list)

    def drop(self, lang: str, reason: str) -> None:
        self.dropped.setdefault(lang, Counter())[reason] += 1

    def as_dict(self, kept: int) -> dict[str, Any]:
        return {
            "records_in_table": self.records,
            "kept": kept,
            "dropped": len(self.dropped_indices),
            "dropped_per_lang": {lang: dict(sorted(c.items())) for lang, c in sorted(self.dropped.items())},
            "dropped_indices": list(self.dropped_indices),
        }


@dataclass(frozen=True)
class ParallelTable:
    """Joined records in the languages ``langs`` (table order), the roles every block answers, and the join report."""

    name: str
    langs: tuple[str, ...]
    roles: tuple[str, ...]
    rows: list[ParallelRow]
    report: JoinReport
    files: dict[str, dict[str, str]]  # label -> {"file", "sha256"}

    @property
    def sha256(self) -> str:
        """One digest of every file the table was read from (labels and their sha256, sorted)."""
        lines = "".join(f"{label}:{info['sha256']}\n" for label, info in sorted(self.files.items()))
        return hashlib.sha256(lines.encode("utf-8")).hexdigest()


class JoinError(ValueError):
    """Pair files that should be cuts of one table disagree; the message names files, record and field."""


def roles_of(field_map: Mapping[str, str]) -> tuple[str, ...]:
    """The roles a field map can ask (both fields of the role mapped), in ``ROLE_FIELDS`` order."""
    missing = [f for f in EDIT_FIELDS if f not in field_map]
    if missing:
        raise ValueError(
            f"the field map must name the edit fields {', '.join(EDIT_FIELDS)}; missing: {', '.join(missing)}"
        )
    unknown = sorted(set(field_map) - set(CANONICAL_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(unknown)} in the field map; known: {', '.join(CANONICAL_FIELDS)}"
        )
    return tuple(role for role, fields in ROLE_FIELDS.items() if all(f in field_map for f in fields))


def _lookup(block: Mapping[str, Any], path: str) -> Any:
    value: Any = block
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def canonical_block(block: Any, field_map: Mapping[str, str]) -> tuple[dict[str, str] | None, str | None]:
    """``block`` read into canonical fields, or ``(None, reason)`` naming the first unusable field."""
    if not isinstance(block, Mapping):
        return None, "block is not an object"
    out: dict[str, str] = {}
    for name, path in field_map.items():
        value = _lookup(block, path)
        if value is None:
            return None, f"field '{path}' missing"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a year or a number written as a JSON number
        if not isinstance(value, str):
            return None, f"field '{path}' is not a string"
        if not value.strip():
            return None, f"field '{path}' empty"
        if len(value) > MAX_FIELD_CHARS:
            return None, f"field '{path}' longer than {MAX_FIELD_CHARS} characters"
        out[name] = value
    return out, None


def join(
    name: str,
    records: Iterable[tuple[int, str, Mapping[str, Any]]],
    langs: Sequence[str],
    field_map: Mapping[str, str],
    files: dict[str, dict[str, str]],
) -> ParallelTable:
    """The table of ``records`` (``(index, key, {lang: raw block})``) in ``langs``.

    A record is kept when every language in ``langs`` has a usable block; otherwise it is counted under each
    language that lacks one, with the reason, and its index is listed.
    """
    roles = roles_of(field_map)
    report = JoinReport()
    rows: list[ParallelRow] = []
    for index, key, raw in records:
        report.records += 1
        blocks: dict[str, dict[str, str]] = {}
        for lang in langs:
            if lang not in raw:
                report.drop(lang, "language block missing")
                continue
            block, reason = canonical_block(raw[lang], field_map)
            if block is None:
                report.drop(lang, reason or "unusable block")
            else:
                blocks[lang] = block
        if len(blocks) == len(langs):
            rows.append(ParallelRow(index=index, key=key, blocks=blocks))
        else:
            report.dropped_indices.append(index)
    return ParallelTable(name=name, langs=tuple(langs), roles=roles, rows=rows, report=report, files=files)


def check_same_block(reference: Mapping[str, Any], other: Mapping[str, Any], where: str) -> None:
    """Two files' copies of one record's shared (English) block must be equal; raise ``JoinError`` naming the field."""
    for key in sorted(set(reference) | set(other)):
        if reference.get(key) != other.get(key):
            raise JoinError(
                f"{where}: field {key!r} differs ({reference.get(key)!r} vs {other.get(key)!r}). The pair files are "
                "not cuts of one table (mixed releases?): use the files of one release."
            )


# ---------------------------------------------------------------- the subject inside the edit prompt


def _edge(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch)[0] in "PSZ"


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` moved inwards past whitespace, punctuation and symbols at both ends of ``text[start:end]``."""
    while start < end and _edge(text[start]):
        start += 1
    while end > start and _edge(text[end - 1]):
        end -= 1
    return start, end


def _candidate_spans(prompt: str, subject: str, lang: str) -> Iterable[tuple[int, int]]:
    """Spans of ``prompt`` about as long as ``subject``: word windows, or character windows for unspaced scripts."""
    if lang.split("-")[0].split("_")[0] in UNSPACED_LANGS or " " not in prompt.strip():
        n = len(subject)
        for width in range(max(1, n - 2), n + 3):
            for start in range(0, max(1, len(prompt) - width + 1)):
                yield start, min(len(prompt), start + width)
        return
    words = [m.span() for m in re.finditer(r"\S+", prompt)]
    n = max(1, len(subject.split()))
    for width in range(max(1, n - 1), n + 2):
        for i in range(0, max(1, len(words) - width + 1)):
            window = words[i : i + width]
            if window:
                yield window[0][0], window[-1][1]


def locate_subject(prompt: str, subject: str, lang: str) -> tuple[str, str]:
    """The subject as it occurs in ``prompt``, and how: ``exact``, ``casefold``, ``fuzzy`` or ``whole_prompt``.

    ``fuzzy`` (a translated subject inflected in its prompt, e.g. Russian "Москва" in "... Москвы?") is the span of
    about the subject's length, in words or (unspaced scripts) characters, that has the most characters in common
    with the subject (``difflib`` matching blocks, case-folded), then the closest length, then comes first; its edge
    punctuation stripped. When no span reaches ``FUZZY_MIN_RATIO`` (the translation changed the script or the
    words), the subject is the whole prompt, so locate-then-edit editors (ROME family), which need the subject's
    last token inside the prompt, read the key at the prompt's last token.
    """
    if subject in prompt:
        return subject, "exact"
    folded, target = prompt.casefold(), subject.casefold()
    if len(folded) == len(prompt) and target in folded:
        start = folded.index(target)
        return prompt[start : start + len(subject)], "casefold"
    best, best_span, best_ratio = (-1, 0), (0, len(prompt)), 0.0
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(target)
    for start, end in _candidate_spans(prompt, subject, lang):
        s, e = strip_span(prompt, start, end)
        if s >= e:
            continue
        matcher.set_seq1(prompt[s:e].casefold())
        matched = sum(block.size for block in matcher.get_matching_blocks())
        rank = (matched, -abs((e - s) - len(subject)))  # most characters in common, then the closest length
        if rank > best:
            best, best_span, best_ratio = rank, (s, e), matcher.ratio()
    if best_ratio < FUZZY_MIN_RATIO:  # nothing alike (a subject left in Latin script in a Japanese prompt): no span
        s, e = strip_span(prompt, 0, len(prompt))
        return (prompt[s:e] if s < e else prompt), "whole_prompt"
    s, e = strip_span(prompt, *best_span)
    return prompt[s:e], "fuzzy"
