"""`lm-eval-xke leaderboard`: merge lm-eval results files into one table, never mixing incomparable numbers.

One row per (model, editor, edit language, protocol). Bi-ZsRE columns follow the paper's order: reliability in
the edit language, generality en/zh, locality en/zh, portability en/zh, then target-language reliability (the
question in the other language), each as EM and F1. Tasks whose name starts with ``mlake`` add one column per
metric they report. MzsRE and BMIKE-53 tasks (``<family>:``) add their summary columns: ``rel_<m>`` (reliability in
the edit language) and ``<role>_xavg_<m>`` (the mean over the other test languages); ``--per-language`` adds every
``<role>_<lang>_<m>``. A BMIKE-53 task is one edit-language pair, so its row's ``edit_lang`` reads ``en>de`` (edit
in English, asked in German). A column never holds numbers measured under two protocols, F1 formulas or data files.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_xke.data import flag_option
from lm_eval_xke.reporting.results import (
    ResultsError,
    find_results_files,
    read_results,
    short_model_name,
    xke_config,
)

BIZSRE_LANGS = ("en", "zh")
# (column stem, role, question language: a code, "edit" for the edit language or "other" for the other one)
BIZSRE_COLUMNS = (
    ("rel", "reliability", "edit"),
    ("gen_en", "generality", "en"),
    ("gen_zh", "generality", "zh"),
    ("loc_en", "locality", "en"),
    ("loc_zh", "locality", "zh"),
    ("port_en", "portability", "en"),
    ("port_zh", "portability", "zh"),
    ("rel_tgt", "reliability", "other"),
)
KEY_COLUMNS = ("model", "editor", "edit_lang", "protocol")
SPLIT_CHOICES = ("protocol", "f1", "data")
FORMATS = ("md", "csv", "latex", "html")


class LeaderboardError(ResultsError):
    """Results that cannot be merged as asked, worded for the user."""


@dataclass
class TaskScores:
    """The scores of one task of one results file, with what makes them comparable."""

    source: Path
    task: str
    family: str  # "bizsre", "mlake", "mzsre" or "bmike53_<dataset>"
    model: str
    editor: str
    edit_lang: str
    protocol: str
    f1: str
    data_sha: str
    n: int
    n_total: int
    limited: bool
    metrics: dict[str, float]


@dataclass
class Row:
    key: tuple[str, str, str, str]
    cells: dict[str, float] = field(default_factory=dict)
    origin: dict[str, TaskScores] = field(default_factory=dict)  # column -> the task it came from
    counts: dict[str, str] = field(default_factory=dict)  # family -> "n" or "n/N*"


# ---------------------------------------------------------------- reading results files


def load_task_scores(path: Path) -> list[TaskScores]:
    """Every Bi-ZsRE, MLaKE, MzsRE and BMIKE-53 task of one lm-eval results file (other tasks are ignored)."""
    results = read_results(path)
    xke = xke_config(results)
    if xke is None:
        raise LeaderboardError(f"{path} was not made with --model xke (no config.xke): rerun with --model xke")
    out = []
    for task, values in (results.get("results") or {}).items():
        family = task_family(task)
        if family is None or task in (results.get("group_subtasks") or {}):
            continue
        out.append(_task_scores(path, results, xke, task, family, values))
    return out


def task_family(task: str) -> str | None:
    for family in ("bizsre", "mlake", "mzsre"):
        if task.startswith(family):
            return family
    if task.startswith("bmike53_"):
        return "_".join(task.split("_")[:2])
    return None


def _edit_lang(task: str, family: str, metadata: dict) -> str:
    """The row's edit language; for a BMIKE-53 pair task ``<edit>><asked>`` (``en>de``, or ``de>en`` reversed)."""
    if family.startswith("bmike53"):
        lang = str(metadata.get("xke_bmike53_lang") or task.rsplit("_gen", 1)[0].rsplit("_", 1)[-1])
        return f"{lang}>en" if flag_option(metadata, "xke_reverse") else f"en>{lang}"
    return str(metadata.get("xke_edit_lang") or task.rsplit("_gen", 1)[0].rsplit("_", 1)[-1])


def _task_scores(path: Path, results: dict, xke: dict, task: str, family: str, values: dict) -> TaskScores:
    metadata = ((results.get("configs") or {}).get(task) or {}).get("metadata") or {}
    protocol = metadata.get("xke_protocol") or _only(xke.get("protocols") or [], f"{path}: protocol of {task}")
    n_samples = (results.get("n-samples") or {}).get(task) or {}
    n = int(n_samples.get("effective", values.get("sample_len", 0)))
    n_total = int(n_samples.get("original", n))
    data = xke.get("data") or []
    data = [d for d in data if d.get("protocol", protocol) == protocol] or data  # a run may record one entry only
    return TaskScores(
        source=path,
        task=task,
        family=family,
        model=short_model_name(str(results.get("model_name") or "?")),
        editor=str(xke.get("editor", "?")),
        edit_lang=_edit_lang(task, family, metadata),
        protocol=str(protocol),
        f1=str(metadata.get("xke_f1") or _only(sorted({d.get("f1", "harmonic") for d in data}), f"{path}: F1")),
        data_sha=_data_sha(data, family),
        n=n,
        n_total=n_total,
        limited=(results.get("config") or {}).get("limit") is not None or n < n_total,
        metrics={
            k.split(",", 1)[0]: float(v)
            for k, v in values.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))
        },
    )


def _only(values: Sequence[Any], what: str) -> Any:
    if len(values) != 1:
        raise LeaderboardError(f"{what} is ambiguous ({', '.join(map(str, values)) or 'none recorded'})")
    return values[0]


def _data_sha(data: list[dict], family: str) -> str:
    """The sha256 of the task's data file; several candidates (two benchmarks in one run) are joined."""
    bench = family.replace("_", "-")  # a parallel table's name (``mzsre``, ``bmike53-zsre``)
    mine = [d for d in data if d.get("benchmark") == bench or family in str(d.get("file", "")).lower()] or data
    return "+".join(sorted({str(d.get("sha256", "?")) for d in mine})) or "?"


# ---------------------------------------------------------------- merging


PARALLEL_METRIC = re.compile(r"(?P<role>[a-z_]+?)_(?P<lang>[a-z]+)_(?P<m>em|f1)(?P<final>_final)?")


def columns_of(scores: TaskScores, per_language: bool = False) -> dict[str, float]:
    """The leaderboard columns a task fills: paper-order Bi-ZsRE stems, ``mlake:<metric>``, or the MzsRE / BMIKE-53
    summary columns ``<family>:rel_<m>`` and ``<family>:<role>_xavg_<m>`` (and every ``<role>_<lang>_<m>`` with
    ``per_language``)."""
    if scores.family == "mlake":
        return {f"mlake:{m}": v for m, v in scores.metrics.items()}
    if scores.family != "bizsre":
        return _parallel_columns(scores, per_language)
    other = next((lang for lang in BIZSRE_LANGS if lang != scores.edit_lang), scores.edit_lang)
    cells = {}
    for stem, role, lang in BIZSRE_COLUMNS:
        lang = {"edit": scores.edit_lang, "other": other}.get(lang, lang)
        for metric in ("em", "f1"):
            value = scores.metrics.get(f"{role}_{lang}_{metric}")
            if value is not None:
                cells[f"{stem}_{metric}"] = value
    return cells


def _parallel_columns(scores: TaskScores, per_language: bool) -> dict[str, float]:
    edit = scores.edit_lang.split(">", 1)[0]
    cells = {}
    for key, value in scores.metrics.items():
        match = PARALLEL_METRIC.fullmatch(key)
        if match is None:
            continue
        role, lang, metric, final = match["role"], match["lang"], match["m"], match["final"] or ""
        if role == "reliability" and lang == edit:
            cells[f"{scores.family}:rel_{metric}{final}"] = value
        if lang == "xavg" or per_language:
            cells[f"{scores.family}:{key}"] = value
    return cells


def merge(scores: Iterable[TaskScores], per_language: bool = False) -> list[Row]:
    """One row per (model, editor, edit language, protocol); a cell filled twice is refused."""
    rows: dict[tuple[str, str, str, str], Row] = {}
    for s in scores:
        key = (s.model, s.editor, s.edit_lang, s.protocol)
        row = rows.setdefault(key, Row(key))
        for column, value in columns_of(s, per_language).items():
            if column in row.cells:
                first = row.origin[column]
                raise LeaderboardError(
                    f"two runs for {'/'.join(key)} both report {column}: {first.task} in {first.source} and "
                    f"{s.task} in {s.source}. Pass only one of them (runs with different hyper-parameters of "
                    "one editor belong in separate leaderboards)."
                )
            row.cells[column] = value
            row.origin[column] = s
        row.counts[s.family] = f"{s.n}/{s.n_total}*" if s.limited else str(s.n)
    return list(rows.values())


def check_columns(rows: Sequence[Row]) -> None:
    """Refuse a column that would hold numbers from two protocols, two F1 formulas or two data files."""
    for column in metric_columns(rows):
        for attr, what, split in (
            ("protocol", "protocols", "protocol"),
            ("f1", "F1 formulas", "f1"),
            ("data_sha", "data files (sha256)", "data"),
        ):
            if attr == "f1" and not (column.endswith("_f1") or column.startswith("mlake:")):
                continue
            seen: dict[str, TaskScores] = {}
            for row in rows:
                if column in row.origin:
                    seen.setdefault(getattr(row.origin[column], attr), row.origin[column])
            if len(seen) > 1:
                runs = "; ".join(f"{value[:16]} ({s.task} in {s.source})" for value, s in seen.items())
                raise LeaderboardError(
                    f"column {column} would mix {what}: {runs}. Numbers measured under different {what} are not "
                    f"comparable. Use --split-by {split} to get one table each, or pass only runs that agree."
                )


def metric_columns(rows: Sequence[Row]) -> list[str]:
    present = {c for row in rows for c in row.cells}
    paper = [f"{stem}_{m}" for stem, _, _ in BIZSRE_COLUMNS for m in ("em", "f1")]
    return [c for c in paper if c in present] + sorted((c for c in present if ":" in c), key=_family_column_order)


_ROLE_ORDER = ("rel", "reliability", "generality", "locality", "portability", "old_answer")


def _family_column_order(column: str) -> tuple:
    """``<family>:`` columns: by family, then ``rel``, then the roles in paper order (``xavg`` first), then the rest."""
    family, metric = column.split(":", 1)
    match = PARALLEL_METRIC.fullmatch(metric) if family != "mlake" else None  # MLaKE's: alphabetical
    if match is None:
        rel = metric.startswith("rel_") and family != "mlake"
        return (family, 0 if rel else len(_ROLE_ORDER), 0, metric)
    role = _ROLE_ORDER.index(match["role"]) if match["role"] in _ROLE_ORDER else len(_ROLE_ORDER)
    return (family, role, 0 if match["lang"] == "xavg" else 1, metric)


def split_rows(rows: Sequence[Row], split_by: Sequence[str]) -> dict[str, list[Row]]:
    """Group rows into separate tables by protocol / F1 formula / data sha256 of their first cell."""
    attrs = {"protocol": "protocol", "f1": "f1", "data": "data_sha"}
    tables: dict[str, list[Row]] = {}
    for row in rows:
        origin = next(iter(row.origin.values()))
        title = ", ".join(f"{name}={str(getattr(origin, attrs[name]))[:16]}" for name in split_by)
        tables.setdefault(title, []).append(row)
    return tables


# ---------------------------------------------------------------- table


@dataclass
class Table:
    title: str
    header: list[str]
    body: list[list[Any]]
    notes: list[str]


def build_table(rows: Sequence[Row], sort: str | None = None, ascending: bool = False, title: str = "") -> Table:
    metrics = metric_columns(rows)
    families = sorted({f for row in rows for f in row.counts})
    header = [*KEY_COLUMNS, "f1_formula", *(f"n_{f}" for f in families), *metrics]
    body = [_row_values(row, families, metrics) for row in rows]
    if sort:
        if sort not in header:
            raise LeaderboardError(f"cannot sort by {sort!r}; columns: {', '.join(header)}")
        i = header.index(sort)
        filled = [r for r in body if r[i] is not None]
        missing = [r for r in body if r[i] is None]
        body = sorted(filled, key=lambda r: r[i], reverse=not ascending) + missing
    return Table(title, header, body, _notes(rows))


def _row_values(row: Row, families: list[str], metrics: list[str]) -> list[Any]:
    f1 = sorted({s.f1 for s in row.origin.values()})
    return [
        *row.key,
        "/".join(f1),
        *(row.counts.get(f, "") for f in families),
        *(row.cells.get(c) for c in metrics),
    ]


def _notes(rows: Sequence[Row]) -> list[str]:
    origins = {id(s): s for row in rows for s in row.origin.values()}.values()
    shas = sorted({s.data_sha for s in origins})
    notes = [
        "Scores are percentages (x100). rel = reliability in the edit language, rel_tgt = reliability asked in the "
        "other language (target-language reliability); gen/loc/port = generality/locality/portability per question "
        "language; em = exact match, f1 = token F1 (formula in f1_formula). <family>:<role>_xavg_<m> = the mean over "
        "the test languages other than the edit language (MzsRE, BMIKE-53); old_answer: lower is better.",
        f"Data sha256: {', '.join(shas)}.",
    ]
    if any(s.limited for s in origins):
        notes.append("* run with --limit (n/N = cases evaluated / cases in the data): not a full-benchmark number.")
    return notes


def render(table: Table, fmt: str) -> str:
    if fmt not in FORMATS:
        raise LeaderboardError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {"md": _markdown, "csv": _csv, "latex": _latex, "html": _html}[fmt](table)


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.{digits}f}"
    return str(value)


def _markdown(t: Table) -> str:
    lines = [f"### {t.title}", ""] if t.title else []
    lines += ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in t.body]
    return "\n".join([*lines, "", *t.notes]) + "\n"


def _csv(t: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(t.header)
    writer.writerows([_cell(v, 4) if v is not None else "" for v in r] for r in t.body)
    return buf.getvalue()


def _latex(t: Table) -> str:
    def esc(text: str) -> str:
        return "".join("\\" + ch if ch in "&%$#_{}" else ch for ch in text)

    lines = [f"% {esc(t.title)}"] if t.title else []
    lines += ["\\begin{tabular}{" + "l" * len(KEY_COLUMNS) + "r" * (len(t.header) - len(KEY_COLUMNS)) + "}"]
    lines += ["\\toprule", " & ".join(esc(h) for h in t.header) + " \\\\", "\\midrule"]
    lines += [" & ".join(esc(_cell(v)) for v in r) + " \\\\" for r in t.body]
    lines += ["\\bottomrule", "\\end{tabular}", *(f"% {esc(n)}" for n in t.notes)]
    return "\n".join(lines) + "\n"


def _html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r) + "</tr>\n" for r in t.body)
    caption = f"<caption>{html.escape(t.title)}</caption>" if t.title else ""
    notes = "".join(f"<p>{html.escape(n)}</p>\n" for n in t.notes)
    return f"<table>{caption}\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n{notes}"


# ---------------------------------------------------------------- entry points


def leaderboard(
    paths: Iterable[str | Path],
    fmt: str = "md",
    sort: str | None = None,
    ascending: bool = False,
    split_by: Sequence[str] = (),
    per_language: bool = False,
) -> str:
    """The rendered leaderboard of every results file in ``paths``."""
    scores = [s for f in find_results_files(paths) for s in load_task_scores(f)]
    if not scores:
        raise LeaderboardError("no Bi-ZsRE, MLaKE, MzsRE or BMIKE-53 task in these results files")
    tables = split_rows(merge(scores, per_language), split_by)
    rendered = []
    for title, rows in tables.items():
        check_columns(rows)
        rendered.append(render(build_table(rows, sort, ascending, title), fmt))
    return "\n".join(rendered)


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="merge results files into one table (md, csv, latex, html)")
    p.add_argument("paths", nargs="+", help="results_*.json files or folders holding them (searched recursively)")
    p.add_argument("--format", choices=FORMATS, default="md")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--sort", help="column to sort by (descending; e.g. rel_em, gen_zh_f1, editor)")
    p.add_argument("--ascending", action="store_true", help="sort ascending")
    p.add_argument(
        "--split-by",
        action="append",
        choices=SPLIT_CHOICES,
        default=[],
        help="one table per protocol / F1 formula / data file instead of refusing to mix them (repeatable)",
    )
    p.add_argument(
        "--per-language",
        action="store_true",
        help="MzsRE / BMIKE-53: a column per test language, not only the rel and cross-lingual mean (xavg) columns",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        text = leaderboard(args.paths, args.format, args.sort, args.ascending, args.split_by, args.per_language)
    except ResultsError as err:
        print(f"lm-eval-xke leaderboard: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0
