"""`lm-eval-xke plot transfer`: the MLaKE edit-language x test-language matrix from lm-eval results files.

Reads one ``results_*.json`` or every one under a folder (the newest file wins for a task that appears twice),
takes ``<role>_<test>_<metric>`` of the tasks ``<family>_<edit>``, prints a markdown table and draws a heatmap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_xke.data import MLAKE_LANGS

FAMILY_METRICS = {"mlake": ("contains", "em"), "mlake_mc": ("acc",)}


@dataclass(frozen=True)
class TransferMatrix:
    """``values[edit][test]`` (NaN where a task was not run), the editor/model names and docs per edit language."""

    values: dict[str, dict[str, float]]
    counts: dict[str, int]
    editor: str
    model: str
    label: str

    @property
    def title(self) -> str:
        return f"MLaKE {self.label}: editor {self.editor}, model {self.model}"


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


def _model_name(config: dict) -> str:
    args = config.get("model_args") or {}
    if isinstance(args, str):
        args = dict(part.split("=", 1) for part in args.split(",") if "=" in part)
    pretrained = str(args.get("pretrained", config.get("model", "?")))
    return Path(pretrained.rstrip("/")).name or pretrained


def _editor_name(config: dict) -> str:
    xke = config.get("xke") or {}
    args = config.get("model_args") or {}
    return str(xke.get("editor") or (args.get("editor") if isinstance(args, dict) else None) or "none")


def transfer_matrix(
    files: list[Path], family: str = "mlake", metric: str = "contains", role: str = "reliability"
) -> TransferMatrix:
    """The 5x5 matrix of ``<role>_<test>_<metric>`` over the tasks ``<family>_<edit>`` found in ``files``."""
    tasks: dict[str, tuple[dict, int]] = {}
    editors, models = set(), set()
    for file in files:
        data: dict[str, Any] = json.loads(Path(file).read_text(encoding="utf-8"))
        for edit in MLAKE_LANGS:
            task = f"{family}_{edit}"
            if task in data.get("results", {}):
                counts = (data.get("n-samples") or {}).get(task) or {}
                tasks[task] = (data["results"][task], int(counts.get("effective", 0)))
                editors.add(_editor_name(data.get("config") or {}))
                models.add(_model_name(data.get("config") or {}))
    if not tasks:
        raise ValueError(f"no {family}_<lang> task in {', '.join(str(f) for f in files)}")
    values = {
        edit: {
            test: float(tasks.get(f"{family}_{edit}", ({}, 0))[0].get(f"{role}_{test}_{metric},none", math.nan))
            for test in MLAKE_LANGS
        }
        for edit in MLAKE_LANGS
    }
    counts = {edit: tasks.get(f"{family}_{edit}", ({}, 0))[1] for edit in MLAKE_LANGS}
    label = f"{family} {role}_{metric}"
    return TransferMatrix(values, counts, " / ".join(sorted(editors)), " / ".join(sorted(models)), label)


def _cell(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(matrix: TransferMatrix) -> str:
    """Rows: edit language (with its doc count); columns: test language; values in percent."""
    lines = [
        f"**{matrix.title}** (percent; rows: edit language, columns: test language)",
        "",
        "| edit \\ test | n | " + " | ".join(MLAKE_LANGS) + " |",
        "|---|---:|" + "---:|" * len(MLAKE_LANGS),
    ]
    for edit in MLAKE_LANGS:
        cells = " | ".join(_cell(matrix.values[edit][test]) for test in MLAKE_LANGS)
        lines.append(f"| {edit} | {matrix.counts[edit] or '–'} | {cells} |")
    return "\n".join(lines)


def plot_heatmap(matrix: TransferMatrix, output: str | Path) -> Path:
    """Save the matrix as an annotated heatmap (percent, 0-100 colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[100 * matrix.values[e][t] for t in MLAKE_LANGS] for e in MLAKE_LANGS]
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(MLAKE_LANGS)), MLAKE_LANGS)
    ax.set_yticks(range(len(MLAKE_LANGS)), [f"{e} (n={matrix.counts[e]})" for e in MLAKE_LANGS])
    ax.set_xlabel("test language")
    ax.set_ylabel("edit language")
    for i, edit in enumerate(MLAKE_LANGS):
        for j, test in enumerate(MLAKE_LANGS):
            value = grid[i][j]
            colour = "gray" if math.isnan(value) else "black" if value > 60 else "white"  # NaN: task not run
            ax.text(j, i, _cell(matrix.values[edit][test]), ha="center", va="center", color=colour)
    ax.set_title("\n".join(textwrap.wrap(matrix.title, 56)), fontsize=10)
    fig.colorbar(image, ax=ax, label="percent")
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def add_plot_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register ``plot transfer`` on the ``lm-eval-xke`` tool parser."""
    plot = sub.add_parser("plot", help="plot results (the MLaKE transfer matrix)")
    kinds = plot.add_subparsers(dest="plot_kind", required=True)
    transfer = kinds.add_parser("transfer", help="5x5 edit-language x test-language heatmap of MLaKE results")
    transfer.add_argument("results", help="a results_*.json file, or a folder searched for them")
    transfer.add_argument("-o", "--output", default="matrix.png", help="PNG to write (default: matrix.png)")
    transfer.add_argument("--family", choices=sorted(FAMILY_METRICS), default="mlake", help="task family")
    transfer.add_argument("--metric", help="em | contains (mlake, default contains), acc (mlake_mc)")
    transfer.add_argument("--role", choices=("reliability", "old_answer"), default="reliability")
    transfer.set_defaults(func=run_transfer)


def run_transfer(args: argparse.Namespace) -> int:
    metric = args.metric or FAMILY_METRICS[args.family][0]
    if metric not in FAMILY_METRICS[args.family]:
        raise SystemExit(f"--metric for {args.family} must be one of {', '.join(FAMILY_METRICS[args.family])}")
    try:
        matrix = transfer_matrix(results_files(args.results), args.family, metric, args.role)
    except (FileNotFoundError, ValueError) as err:  # a wrong path or a folder without MLaKE results: one line
        raise SystemExit(f"lm-eval-xke plot transfer: {err}") from None
    print(markdown_table(matrix))
    print(f"\nwrote {plot_heatmap(matrix, args.output)}")
    return 0
