"""`lm-eval-xke report-plot bars|gap`: PNG figures of merged Bi-ZsRE results for one model (needs matplotlib).

- ``bars``: one panel per edit language; per metric column (paper order) a group of bars, one bar per editor.
- ``gap``: the cross-lingual gap per editor: score with the question in the edit language minus the score with
  the question in the other language, for reliability, generality and portability (0 = no gap).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lm_eval_xke.cases import PROTOCOLS
from lm_eval_xke.leaderboard import (
    BIZSRE_COLUMNS,
    BIZSRE_LANGS,
    LeaderboardError,
    Row,
    check_columns,
    find_results_files,
    load_task_scores,
    merge,
)

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
        raise LeaderboardError(
            f"pick one model with --model; the {protocol} results hold: {', '.join(models) or 'none'}"
        )
    check_columns(chosen)
    return chosen


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LeaderboardError("plots need matplotlib, a dependency of lm_eval_xke: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def save_figure(fig, plt, out: str | Path) -> Path:
    out = Path(out)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report-plot", help="PNG plots of merged Bi-ZsRE results: bars per metric, cross-lingual gap")
    p.add_argument("kind", choices=("bars", "gap"), help="bars: metrics across editors; gap: edit vs other language")
    p.add_argument("paths", nargs="+", help="results_*.json files or folders holding them")
    p.add_argument("--model", help="the model to plot (needed when the results hold several)")
    p.add_argument("--metric", choices=("em", "f1"), default="em")
    p.add_argument("--protocol", choices=PROTOCOLS, default="teacher_forced", help="which protocol's runs to plot")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        rows = rows_for_model(args.paths, args.model, args.protocol)
        plot = plot_bars if args.kind == "bars" else plot_gap
        print(f"wrote {plot(rows, args.metric, args.out)}")
    except LeaderboardError as err:
        print(f"lm-eval-xke report-plot: error: {err}", file=sys.stderr)
        return 2
    return 0
