"""`lm-eval-xke plot transfer`: the edit-language x test-language matrix from lm-eval results files.

Reads one ``results_*.json`` or every one under a folder (the newest file wins for a task that appears twice),
takes ``<role>_<test>_<metric>`` of a family's tasks (MLaKE, MzsRE, BMIKE-53), prints a markdown table and draws a
heatmap. A task's edit language is its ``xke_edit_lang`` (BMIKE-53: English, or ``<lang>`` under ``xke_reverse``);
cells that several tasks fill (BMIKE-53's English-to-English) are their mean weighted by sample count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_xke.data import MLAKE_LANGS, flag_option
from lm_eval_xke.leaderboard import model_label
from lm_eval_xke.parallel_data import BMIKE53_DATASETS, BMIKE53_LANGS, MZSRE_LANGS


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
    """``path`` itself, or every ``results_*.json`` under it, oldest first (by name: lm-eval stamps the time).

    Linked folders are followed, so one folder of links can gather the runs of several output paths."""
    given = Path(path)
    if given.is_file():
        return [given]
    found = sorted(
        (
            Path(folder) / name
            for folder, _, names in os.walk(given, followlinks=True)
            for name in names
            if name.startswith("results_") and name.endswith(".json")
        ),
        key=lambda p: p.name,
    )
    if not found:
        raise FileNotFoundError(f"no results_*.json file under {given}: give lm_eval's --output_path or one file")
    return found


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
        data: dict[str, Any] = json.loads(Path(file).read_text(encoding="utf-8"))
        for task, values in (data.get("results") or {}).items():
            named = re.fullmatch(spec.pattern, task)
            if named and named.group(1) in spec.langs:
                counts = (data.get("n-samples") or {}).get(task) or {}
                edit = _edit_lang(task, spec, (data.get("configs") or {}).get(task) or {})
                tasks[task] = (values, int(counts.get("effective", 0)), edit)
                editors.add(_editor_name(data.get("config") or {}))
                models.add(model_label(data.get("config") or {}))
    if not tasks:
        raise ValueError(f"no {family} task in {', '.join(str(f) for f in files)}")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_title("\n".join(textwrap.wrap(matrix.title, int(9 * width))), fontsize=10)
    fig.colorbar(image, ax=ax, label="percent")
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def add_subcommand(sub: argparse._SubParsersAction) -> None:
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
    except (FileNotFoundError, ValueError) as err:  # a wrong path or a folder without the family's results: one line
        raise SystemExit(f"lm-eval-xke plot transfer: {err}") from None
    print(markdown_table(matrix))
    print(f"\nwrote {plot_heatmap(matrix, args.output)}")
    return 0
