"""Figures of lm-eval results files (PNG, with matplotlib).

- ``lm-eval-xke plot transfer``: the edit-language x test-language matrix of MLaKE, MzsRE or BMIKE-53 results.
- ``lm-eval-xke report-plot bars|gap``: merged Bi-ZsRE results of one model. ``bars``: one panel per edit language;
  per metric column (paper order) a group of bars, one bar per editor. ``gap``: the cross-lingual gap per editor:
  score with the question in the edit language minus the score with the question in the other language, for
  reliability, generality and portability (0 = no gap).

The transfer matrix reads one ``results_*.json`` or every one under a folder (the newest file wins for a task that
appears twice),
takes ``<role>_<test>_<metric>`` of a family's tasks (MLaKE, MzsRE, BMIKE-53), prints a markdown table and draws a
heatmap. A task's edit language is its ``xke_edit_lang`` (BMIKE-53: English, or ``<lang>`` under ``xke_reverse``);
cells that several tasks fill (BMIKE-53's English-to-English) are their mean weighted by sample count.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_eval_xke.cases import PROTOCOLS
from lm_eval_xke.data import MLAKE_LANGS, flag_option
from lm_eval_xke.parallel_data import BMIKE53_DATASETS, BMIKE53_LANGS, MZSRE_LANGS
from lm_eval_xke.reporting.leaderboard import BIZSRE_COLUMNS, BIZSRE_LANGS, Row, check_columns, load_task_scores, merge
from lm_eval_xke.reporting.results import ResultsError, find_results_files, model_label, read_results

# ---------------------------------------------------------------- matplotlib


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    try:
        import matplotlib
    except ImportError:
        raise ResultsError("plots need matplotlib, a dependency of lm_eval_xke: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fitted_title(text: str, fig, chars_per_inch: float = 9) -> str:
    """``text`` wrapped to the figure's width (about ``chars_per_inch`` characters per inch at the title's size)."""
    return "\n".join(textwrap.wrap(text, int(chars_per_inch * fig.get_figwidth())))


def save_figure(fig, plt, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- the transfer matrix (MLaKE, MzsRE, BMIKE-53)


@dataclass(frozen=True)
class Family:
    """Tasks whose names match ``pattern`` (group 1: the edit language in the name), on the axis ``langs``."""

    title: str
    pattern: str
    langs: tuple[str, ...]
    metrics: tuple[str, ...]


FAMILIES = {
    "mlake": Family("MLaKE", r"mlake_([a-z]+)", MLAKE_LANGS, ("contains", "em")),
    "mlake_mc": Family("MLaKE", r"mlake_mc_([a-z]+)", MLAKE_LANGS, ("acc",)),
    "mzsre": Family("MzsRE", r"mzsre_([a-z]+)", MZSRE_LANGS, ("em", "f1")),
    "mzsre_gen": Family("MzsRE", r"mzsre_([a-z]+)_gen", MZSRE_LANGS, ("em", "f1")),
    **{
        f"bmike53_{name}{suffix}": Family(
            f"BMIKE-53 {folder}", rf"bmike53_{name}_([a-z]+){suffix}", BMIKE53_LANGS, ("em", "f1")
        )
        for name, (folder, _) in BMIKE53_DATASETS.items()
        for suffix in ("", "_gen")
    },
}
#: a family of more languages than this shows only the rows and columns its results fill
FULL_AXIS_MAX = 12
ROLES = ("reliability", "generality", "locality", "portability", "old_answer")


@dataclass(frozen=True)
class TransferMatrix:
    """``values[edit][test]`` (NaN where no task filled it), the axis languages, editor/model, docs per edit."""

    values: dict[str, dict[str, float]]
    counts: dict[str, int]
    editor: str
    model: str
    label: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    family_title: str = "MLaKE"

    @property
    def title(self) -> str:
        return f"{self.family_title} {self.label}: editor {self.editor}, model {self.model}"


def results_files(path: str | Path) -> list[Path]:
    """``path`` itself, or every ``results_*.json`` under it, oldest first (by name: lm-eval stamps the time)."""
    return sorted(find_results_files([path]), key=lambda p: p.name)


def _editor_name(config: dict) -> str:
    xke = config.get("xke") or {}
    args = config.get("model_args") or {}
    return str(xke.get("editor") or (args.get("editor") if isinstance(args, dict) else None) or "none")


def _edit_lang(task: str, family: Family, config: dict) -> str:
    """The edit language of ``task``: its metadata says (``xke_edit_lang``; BMIKE-53 edits in English unless
    ``xke_reverse``), else the language in its name."""
    meta = config.get("metadata") or {}
    if meta.get("xke_edit_lang"):
        return str(meta["xke_edit_lang"])
    named = re.fullmatch(family.pattern, task).group(1)
    if task.startswith("bmike53_"):
        return named if flag_option(meta, "xke_reverse") else "en"
    return named


def transfer_matrix(
    files: list[Path], family: str = "mlake", metric: str = "contains", role: str = "reliability"
) -> TransferMatrix:
    """The matrix of ``<role>_<test>_<metric>`` over the ``family``'s tasks found in ``files``."""
    spec = FAMILIES[family]
    tasks: dict[str, tuple[dict, int, str]] = {}
    editors, models = set(), set()
    for file in files:
        data = read_results(file)
        for task, values in (data.get("results") or {}).items():
            named = re.fullmatch(spec.pattern, task)
            if named and named.group(1) in spec.langs:
                counts = (data.get("n-samples") or {}).get(task) or {}
                edit = _edit_lang(task, spec, (data.get("configs") or {}).get(task) or {})
                tasks[task] = (values, int(counts.get("effective", 0)), edit)
                editors.add(_editor_name(data.get("config") or {}))
                models.add(model_label(data.get("config") or {}))
    if not tasks:
        raise ResultsError(f"no {family} task in {', '.join(str(f) for f in files)}")
    sums: dict[tuple[str, str], list[float]] = {}
    counts: dict[str, int] = {}
    for values, n, edit in tasks.values():
        counts[edit] = counts.get(edit, 0) + n
        for test in spec.langs:
            value = values.get(f"{role}_{test}_{metric},none")
            if isinstance(value, (int, float)):
                cell = sums.setdefault((edit, test), [0.0, 0.0])
                cell[0] += value * max(n, 1)
                cell[1] += max(n, 1)
    if len(spec.langs) <= FULL_AXIS_MAX:
        rows = columns = spec.langs
    else:
        rows = tuple(lang for lang in spec.langs if lang in counts)
        columns = tuple(lang for lang in spec.langs if any(test == lang for _, test in sums))
    values = {e: {t: (sums[e, t][0] / sums[e, t][1]) if (e, t) in sums else math.nan for t in columns} for e in rows}
    label = f"{family} {role}_{metric}"
    editor, model = " / ".join(sorted(editors)), " / ".join(sorted(models))
    return TransferMatrix(values, counts, editor, model, label, rows, columns, spec.title)


def _cell(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(matrix: TransferMatrix) -> str:
    """Rows: edit language (with its doc count); columns: test language; values in percent."""
    lines = [
        f"**{matrix.title}** (percent; rows: edit language, columns: test language)",
        "",
        "| edit \\ test | n | " + " | ".join(matrix.columns) + " |",
        "|---|---:|" + "---:|" * len(matrix.columns),
    ]
    for edit in matrix.rows:
        cells = " | ".join(_cell(matrix.values[edit][test]) for test in matrix.columns)
        lines.append(f"| {edit} | {matrix.counts.get(edit) or '–'} | {cells} |")
    return "\n".join(lines)


def plot_heatmap(matrix: TransferMatrix, output: str | Path) -> Path:
    """Save the matrix as an annotated heatmap (percent, 0-100 colour scale)."""
    plt = pyplot()
    rows, columns = matrix.rows, matrix.columns
    grid = [[100 * matrix.values[e][t] for t in columns] for e in rows]
    width, height = max(6.4, 1.2 + 0.55 * len(columns)), max(2.4, 1.6 + 0.5 * len(rows))
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > FULL_AXIS_MAX else 0)
    ax.set_yticks(range(len(rows)), [f"{e} (n={matrix.counts.get(e, 0)})" for e in rows])
    ax.set_xlabel("test language")
    ax.set_ylabel("edit language")
    for i, edit in enumerate(rows):
        for j, test in enumerate(columns):
            value = grid[i][j]
            colour = "gray" if math.isnan(value) else "black" if value > 60 else "white"  # NaN: task not run
            ax.text(j, i, _cell(matrix.values[edit][test]), ha="center", va="center", color=colour, fontsize=7)
    ax.set_title(fitted_title(matrix.title, fig), fontsize=10)
    fig.colorbar(image, ax=ax, label="percent")
    return save_figure(fig, plt, output)


def _add_transfer(sub: argparse._SubParsersAction) -> None:
    """Register ``plot transfer`` on the ``lm-eval-xke`` tool parser."""
    plot = sub.add_parser("plot", help="plot results (the transfer matrix)")
    kinds = plot.add_subparsers(dest="plot_kind", required=True)
    transfer = kinds.add_parser(
        "transfer", help="edit-language x test-language heatmap of MLaKE, MzsRE or BMIKE-53 results"
    )
    transfer.add_argument("results", help="a results_*.json file, or a folder searched for them")
    transfer.add_argument("-o", "--output", default="matrix.png", help="PNG to write (default: matrix.png)")
    transfer.add_argument("--family", choices=sorted(FAMILIES), default="mlake", help="task family")
    transfer.add_argument(
        "--metric", help="mlake: contains (default) | em; mlake_mc: acc; mzsre*, bmike53_*: em (default) | f1"
    )
    transfer.add_argument("--role", choices=ROLES, default="reliability")
    transfer.set_defaults(func=run_transfer)


def run_transfer(args: argparse.Namespace) -> int:
    metrics = FAMILIES[args.family].metrics
    metric = args.metric or metrics[0]
    if metric not in metrics:
        raise SystemExit(f"--metric for {args.family} must be one of {', '.join(metrics)}")
    try:
        matrix = transfer_matrix(results_files(args.results), args.family, metric, args.role)
    except ResultsError as err:  # a wrong path or a folder without the family's results: one line
        raise SystemExit(f"lm-eval-xke plot transfer: {err}") from None
    print(markdown_table(matrix))
    print(f"\nwrote {plot_heatmap(matrix, args.output)}")
    return 0


# ---------------------------------------------------------------- Bi-ZsRE bars and cross-lingual gap

GAP_ROLES = (("reliability", "rel", "rel_tgt"), ("generality", "gen", "gen"), ("portability", "port", "port"))


def rows_for_model(paths: Sequence[str | Path], model: str | None, protocol: str = "teacher_forced") -> list[Row]:
    """Merged rows of one model (the only one, if ``model`` is None) and protocol, checked like a leaderboard."""
    scores = [s for f in find_results_files(paths) for s in load_task_scores(f)]
    rows = merge(s for s in scores if s.family == "bizsre" and s.protocol == protocol)
    models = sorted({r.key[0] for r in rows})
    if model is None and len(models) == 1:
        model = models[0]
    chosen = [r for r in rows if r.key[0] == model]
    if not chosen:
        raise ResultsError(f"pick one model with --model; the {protocol} results hold: {', '.join(models) or 'none'}")
    check_columns(chosen)
    return chosen


def plot_bars(rows: Sequence[Row], metric: str, out: str | Path) -> Path:
    """Grouped bars: x = metric columns in the paper's order, one bar per editor, one panel per edit language."""
    plt = pyplot()
    langs = sorted({r.key[2] for r in rows})
    editors = sorted({r.key[1] for r in rows})
    stems = [stem for stem, _, _ in BIZSRE_COLUMNS]
    fig, axes = plt.subplots(len(langs), 1, figsize=(1.1 * len(stems) + 2, 3.2 * len(langs)), squeeze=False)
    width = 0.8 / len(editors)
    for ax, lang in zip(axes[:, 0], langs, strict=True):
        for i, editor in enumerate(editors):
            row = next((r for r in rows if r.key[1] == editor and r.key[2] == lang), None)
            values = [100 * (row.cells.get(f"{s}_{metric}") or 0.0) if row else 0.0 for s in stems]
            xs = [x + (i - (len(editors) - 1) / 2) * width for x in range(len(stems))]
            ax.bar(xs, values, width, label=editor)
        ax.set_xticks(range(len(stems)), stems)
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.set_title(f"{rows[0].key[0]}: edits in {lang} ({rows[0].key[3]})")
        ax.legend(title="editor", fontsize=8)
    return save_figure(fig, plt, out)


def gap_values(row: Row, metric: str) -> dict[str, float | None]:
    """Edit-language score minus other-language score per role, in percentage points."""
    lang = row.key[2]
    other = next((x for x in BIZSRE_LANGS if x != lang), lang)
    gaps = {}
    for role, stem, other_stem in GAP_ROLES:
        src_key = f"{stem}_{metric}" if role == "reliability" else f"{stem}_{lang}_{metric}"
        dst_key = f"{other_stem}_{metric}" if role == "reliability" else f"{other_stem}_{other}_{metric}"
        src, dst = row.cells.get(src_key), row.cells.get(dst_key)
        gaps[role] = None if src is None or dst is None else 100 * (src - dst)
    return gaps


def plot_gap(rows: Sequence[Row], metric: str, out: str | Path) -> Path:
    """Per editor, bars of the cross-lingual gap for each role; one panel per edit language."""
    plt = pyplot()
    langs = sorted({r.key[2] for r in rows})
    editors = sorted({r.key[1] for r in rows})
    fig, axes = plt.subplots(1, len(langs), figsize=(2.2 * len(editors) * len(langs) + 2, 3.6), squeeze=False)
    width = 0.8 / len(GAP_ROLES)
    for ax, lang in zip(axes[0], langs, strict=True):
        other = next((x for x in BIZSRE_LANGS if x != lang), lang)
        for j, (role, _, _) in enumerate(GAP_ROLES):
            values = []
            for editor in editors:
                row = next((r for r in rows if r.key[1] == editor and r.key[2] == lang), None)
                values.append((gap_values(row, metric)[role] if row else None) or 0.0)
            xs = [x + (j - 1) * width for x in range(len(editors))]
            bars = ax.bar(xs, values, width, label=role)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(editors)), editors)
        ax.set_ylabel(f"{metric.upper()} gap {lang} - {other} (points)")
        ax.set_title(f"{rows[0].key[0]}: edits in {lang}")
        ax.legend(fontsize=8)
    return save_figure(fig, plt, out)


def _add_report_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report-plot", help="PNG plots of merged Bi-ZsRE results: bars per metric, cross-lingual gap")
    p.add_argument("kind", choices=("bars", "gap"), help="bars: metrics across editors; gap: edit vs other language")
    p.add_argument("paths", nargs="+", help="results_*.json files or folders holding them")
    p.add_argument("--model", help="the model to plot (needed when the results hold several)")
    p.add_argument("--metric", choices=("em", "f1"), default="em")
    p.add_argument("--protocol", choices=PROTOCOLS, default="teacher_forced", help="which protocol's runs to plot")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=_run_report_plot)


def _run_report_plot(args: argparse.Namespace) -> int:
    try:
        rows = rows_for_model(args.paths, args.model, args.protocol)
        plot = plot_bars if args.kind == "bars" else plot_gap
        print(f"wrote {plot(rows, args.metric, args.out)}")
    except ResultsError as err:
        print(f"lm-eval-xke report-plot: error: {err}", file=sys.stderr)
        return 2
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """``plot transfer`` and ``report-plot`` (one module, both commands)."""
    _add_transfer(sub)
    _add_report_plot(sub)
