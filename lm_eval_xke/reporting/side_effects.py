"""`lm-eval-xke side-effects`: what held edits did to ordinary lm-eval tasks, per task and language.

Give the results of one run without an edit set (``--model hf``, or ``--model xke`` without ``edit_set``) and of one
or more runs with ``edit_set=...``. Each row is a task's metric in one language: the unedited score, the edited one,
and the difference with its standard error: paired (the standard error of the mean per-question difference) when
every run logged its samples (``--log_samples``), else ``sqrt(se_edited^2 + se_unedited^2)`` from lm-eval's own
stderrs (the runs as independent samples, which overstates the error of a difference on the same questions). With
several edited runs (say 10, 100 and 1000 held edits) the table and the plot follow the difference as edits grow.
A task's language is the last part of its name when that looks like a language tag (``xnli_zh``, ``mc_facts_ja``,
``belebele_zho_Hans``); other tasks are listed under ``-``, and a group's aggregate under ``all``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_xke.reporting.plots import fitted_title, pyplot, save_figure
from lm_eval_xke.reporting.results import (
    ResultsError,
    find_results_files,
    model_args_of,
    model_label,
    read_results,
    xke_config,
)

#: ``<family>_<lang>``: a 2-3 letter code, optionally with a script (``zho_Hans``) or region (``pt_BR``)
LANGUAGE_SUFFIX = re.compile(r"^(?P<family>.+?)_(?P<lang>[a-z]{2,3}(?:_(?:[A-Z][a-z]{3}|[A-Z]{2}))?)$")


SE_PAIRED = "standard error of the mean per-question difference (paired: both runs' logged samples)"
SE_UNPAIRED = (
    "sqrt(se_edited² + se_unedited²) from lm-eval's stderrs (unpaired: run with --log_samples for the paired "
    "error, which is smaller on the same questions)"
)


class SideEffectsError(ResultsError):
    """Runs that cannot be compared, or a results file that is not what the command needs."""


@dataclass(frozen=True)
class Run:
    """One lm-eval results file and the edit set it held (None: the unedited model)."""

    path: Path
    results: dict[str, Any]
    edit_set: dict[str, Any] | None
    xke: dict[str, Any]

    @property
    def held(self) -> int:
        return int(self.edit_set["count"]) if self.edit_set else 0

    @property
    def label(self) -> str:
        if not self.edit_set:
            return "unedited"
        failed = f", {self.edit_set['n_failed']} failed" if self.edit_set.get("n_failed") else ""
        return f"{self.held} held{failed}"


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float | None


@dataclass(frozen=True)
class Row:
    """One metric of one task, unedited and under each edited run (in the order of ``Comparison.edited``), and the
    differences edited - unedited with their standard errors."""

    task: str
    family: str
    lang: str
    metric: str
    unedited: Score
    edited: tuple[Score, ...]
    deltas: tuple[Score, ...]


def unpaired_delta(before: Score, after: Score) -> Score:
    """The difference with ``sqrt(se_after^2 + se_before^2)``: the two scores as independent samples."""
    missing = before.stderr is None or after.stderr is None
    return Score(after.value - before.value, None if missing else math.sqrt(before.stderr**2 + after.stderr**2))


def paired_delta(before: Score, after: Score, before_docs: dict, after_docs: dict) -> Score:
    """The difference with the standard error of the mean per-question difference (the same questions asked of
    both models: only the answers that changed add to the error)."""
    differences = [after_docs[doc] - before_docs[doc] for doc in before_docs]
    n = len(differences)
    mean = sum(differences) / n
    stderr = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1) / n) if n > 1 else None
    return Score(after.value - before.value, stderr)


@dataclass(frozen=True)
class Comparison:
    unedited: Run
    edited: tuple[Run, ...]  # fewest held edits first
    rows: tuple[Row, ...]
    skipped: tuple[str, ...]  # tasks not in every run
    paired: bool  # standard errors from per-question differences (every run logged its samples)

    @property
    def title(self) -> str:
        first = self.edited[0]
        spec = first.edit_set
        where = f"{spec['task']} from case {spec['offset']}, {spec['mode']}"
        counts = ", ".join(run.label for run in self.edited)
        model = model_label(first.results.get("config") or {})
        return f"Side effects of held edits ({counts}; editor {first.xke.get('editor')}, {where}) on {model}"


# ---------------------------------------------------------------- reading and checking runs


def load_run(path: str | Path) -> Run:
    files = find_results_files([path])
    if len(files) != 1:
        raise SideEffectsError(
            f"{path} holds {len(files)} results files; name one of them: " + ", ".join(str(f) for f in files[:5])
        )
    results = read_results(files[0])
    xke = xke_config(results) or {}
    return Run(files[0], results, xke.get("edit_set"), xke)


def split_runs(runs: Sequence[Run]) -> tuple[Run, tuple[Run, ...]]:
    """The one unedited run, and the edited ones by number of held edits; mismatched runs are refused."""
    unedited = [r for r in runs if r.edit_set is None]
    edited = sorted((r for r in runs if r.edit_set is not None), key=lambda r: r.held)
    if len(unedited) != 1 or not edited:
        raise SideEffectsError(
            f"side-effects needs exactly one run without an edit set and at least one with edit_set=...; got "
            f"{len(unedited)} without ({', '.join(str(r.path) for r in unedited) or 'none'}) and {len(edited)} with"
        )
    for run in edited:
        differences = _differences(unedited[0], run)
        if differences:
            raise SideEffectsError(
                f"{run.path} and {unedited[0].path} differ in {'; '.join(differences)}: their scores are not comparable"
            )
        if _edit_set_identity(run) != _edit_set_identity(edited[0]):
            raise SideEffectsError(
                f"{run.path} and {edited[0].path} hold different edit sets or editors (task, offset, mode, editor and "
                "hyper-parameters must agree; only the count may differ): compare them in separate commands"
            )
    if len({r.held for r in edited}) != len(edited):
        raise SideEffectsError("two edited runs hold the same number of edits: give one run per count")
    return unedited[0], tuple(edited)


def _edit_set_identity(run: Run) -> tuple:
    """What runs of one growth curve share: all but the number of held edits."""
    spec = run.edit_set
    return spec["task"], spec["offset"], spec["mode"], run.xke.get("editor"), json.dumps(run.xke.get("hparams"))


def _differences(a: Run, b: Run) -> list[str]:
    """What differs between two runs in what makes scores comparable (model, task versions, few-shot, limit)."""
    found = []
    both_fingerprinted = bool(a.xke.get("weights") and b.xke.get("weights"))
    model_a, model_b = _model_identity(a, both_fingerprinted), _model_identity(b, both_fingerprinted)
    if model_a != model_b:
        found.append(f"the model ({model_a} vs {model_b})")
    for key, what in (("versions", "task versions"), ("n-shot", "few-shot settings")):
        shared = set(a.results.get(key) or {}) & set(b.results.get(key) or {})
        differing = sorted(t for t in shared if a.results[key][t] != b.results[key][t])
        if differing:
            found.append(f"{what} of {', '.join(differing)}")
    limit_a, limit_b = (r.results.get("config", {}).get("limit") for r in (a, b))
    if limit_a != limit_b:
        found.append(f"--limit ({limit_a} vs {limit_b})")
    return found


def _model_identity(run: Run, fingerprint: bool) -> tuple:
    """The unedited weights' fingerprint (both runs ``--model xke``), else checkpoint, revision and dtype."""
    if fingerprint:
        return ("weights", run.xke["weights"])
    args = model_args_of(run.results.get("config") or {})
    return ("checkpoint", args.get("pretrained", "").rstrip("/"), args.get("revision"), args.get("dtype", "auto"))


# ---------------------------------------------------------------- the comparison


def language_of(task: str) -> tuple[str, str]:
    """``(family, language)`` from a task name: ``xnli_zh`` -> ``("xnli", "zh")``; no tag -> ``(task, "-")``."""
    match = LANGUAGE_SUFFIX.match(task)
    return (match["family"], match["lang"]) if match else (task, "-")


def scores_of(run: Run, metrics: Sequence[str] = ()) -> dict[tuple[str, str], Score]:
    """Every ``(task, metric,filter)`` score of a run that lm-eval reported with a stderr (groups included)."""
    out = {}
    for task, values in (run.results.get("results") or {}).items():
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            if metrics and name not in metrics:
                continue
            stderr = values.get(f"{name}_stderr,{filt}")
            out[task, key] = Score(float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def per_question(run: Run, task: str, metric: str) -> dict[tuple[str, int], float] | None:
    """A task's (or group's) per-question values of ``metric,filter`` from the samples logged beside the results
    file (``--log_samples``), keyed by (task, doc id); None when they were not logged."""
    name, _, filt = metric.partition(",")
    stamp = run.path.stem.removeprefix("results_")
    values = {}
    for subtask in (run.results.get("group_subtasks") or {}).get(task) or [task]:
        path = run.path.with_name(f"samples_{subtask}_{stamp}.jsonl")
        if not path.is_file():
            return None
        for line in path.open(encoding="utf-8"):
            sample = json.loads(line)
            if sample.get("filter") == filt and isinstance(sample.get(name), (int, float)):
                values[subtask, int(sample["doc_id"])] = float(sample[name])
    return values or None


def compare(runs: Sequence[Run], metrics: Sequence[str] = ()) -> Comparison:
    unedited, edited = split_runs(runs)
    base = scores_of(unedited, metrics)
    per_run = [scores_of(run, metrics) for run in edited]
    groups = unedited.results.get("group_subtasks") or {}
    shared = [key for key in base if all(key in scores for scores in per_run)]
    docs = {(run.path, *key): per_question(run, *key) for run in (unedited, *edited) for key in shared}
    # paired only where every run logged the same questions, so that every row's error means the same thing
    paired = all(docs.values()) and all(
        docs[run.path, *key].keys() == docs[unedited.path, *key].keys() for run in edited for key in shared
    )
    rows = []
    for task, metric in shared:
        family, lang = (task, "all") if task in groups else language_of(task)
        before, after = base[task, metric], tuple(s[task, metric] for s in per_run)
        if paired:
            deltas = tuple(
                paired_delta(before, a, docs[unedited.path, task, metric], docs[run.path, task, metric])
                for run, a in zip(edited, after, strict=True)
            )
        else:
            deltas = tuple(unpaired_delta(before, a) for a in after)
        rows.append(Row(task, family, lang, metric, before, after, deltas))
    skipped = {task for task, _ in base} - {task for task, _ in shared}
    for scores in per_run:
        skipped |= {task for task, _ in scores} - {task for task, _ in base}
    if not rows:
        raise SideEffectsError(
            "the runs share no task metric with a score"
            + (f" named {', '.join(metrics)}" if metrics else "")
            + ": run the same --tasks with and without edit_set"
        )
    rows.sort(key=lambda r: (r.family, r.lang in ("all", "-"), r.lang, r.metric))
    return Comparison(unedited, edited, tuple(rows), tuple(sorted(skipped)), paired)


# ---------------------------------------------------------------- output


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _signed(score: Score) -> str:
    stderr = "" if score.stderr is None else f" ± {score.stderr:.4f}"
    return f"{score.value:+.4f}{stderr}"


def markdown(comparison: Comparison) -> str:
    edited = comparison.edited
    if len(edited) == 1:
        header = ["task", "lang", "metric", "unedited", "edited", "Δ ± se"]
        body = [
            [r.family, r.lang, r.metric, _number(r.unedited.value), _number(r.edited[0].value), _signed(r.deltas[0])]
            for r in comparison.rows
        ]
    else:
        header = ["task", "lang", "metric", "unedited", *(f"Δ {run.label} ± se" for run in edited)]
        body = [
            [r.family, r.lang, r.metric, _number(r.unedited.value), *(_signed(r.deltas[i]) for i in range(len(edited)))]
            for r in comparison.rows
        ]
    lines = [
        f"### {comparison.title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cells) + " |" for cells in body),
        "",
        f"Δ = edited - unedited, lm-eval's own metric; se = {SE_PAIRED if comparison.paired else SE_UNPAIRED}.",
    ]
    if comparison.skipped:
        lines.append(f"Not in every run, left out: {', '.join(comparison.skipped)}.")
    return "\n".join(lines) + "\n"


def csv_table(comparison: Comparison) -> str:
    """Long format: one line per row and edited run; lm-eval's ``metric,filter`` key in two columns."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "family", "lang", "metric", "filter", "held_edits", "failed_edits", "unedited",
                     "unedited_stderr", "edited", "edited_stderr", "delta", "delta_stderr"])  # fmt: skip
    for r in comparison.rows:
        metric, _, filt = r.metric.partition(",")
        for i, run in enumerate(comparison.edited):
            after, delta = r.edited[i], r.deltas[i]
            values = [r.unedited.value, r.unedited.stderr, after.value, after.stderr, delta.value, delta.stderr]
            failed = run.edit_set.get("n_failed", 0)
            writer.writerow([r.task, r.family, r.lang, metric, filt, run.held, failed, *map(_number, values)])
    return out.getvalue()


def plot(comparison: Comparison, metric: str, out: str | Path) -> Path:
    """One edited run: bars of Δ per language (error bars: se), one panel per task. Several: Δ against held edits,
    one line per language, one panel per task."""
    rows = [r for r in comparison.rows if r.metric == metric]
    if not rows:
        raise SideEffectsError(f"no task reports metric {metric!r}: choose one with --metric (e.g. acc,none)")
    plt = pyplot()
    families = sorted({r.family for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 3.6), squeeze=False)
    held = [run.held for run in comparison.edited]
    for ax, family in zip(axes[0], families, strict=True):
        mine = [r for r in rows if r.family == family]
        if len(held) == 1:
            deltas = [r.deltas[0] for r in mine]
            errors = [d.stderr or 0.0 for d in deltas]
            ax.bar([r.lang for r in mine], [d.value for d in deltas], yerr=errors, capsize=3, color="tab:blue")
            ax.set_xlabel("language")
        else:
            for r in mine:
                deltas = [Score(0.0, 0.0)] + [r.deltas[i] for i in range(len(held))]
                xs = [0, *held]
                ax.errorbar(xs, [d.value for d in deltas], yerr=[d.stderr or 0.0 for d in deltas], capsize=3,
                            marker="o", label=r.lang)  # fmt: skip
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlabel("held edits")
            ax.legend(fontsize=8)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(family)
        ax.set_ylabel(f"Δ {metric} (edited - unedited)")
    fig.suptitle(fitted_title(comparison.title, fig, chars_per_inch=11), fontsize=8)
    return save_figure(fig, plt, out)


# ---------------------------------------------------------------- command


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "side-effects",
        help="ordinary lm-eval tasks on the model with held edits (edit_set=...) vs without, per task and language",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="results files or --output_path folders: one unedited run, 1+ edited")
    p.add_argument("--metric", action="append", default=[], help="only this metric (e.g. acc); repeatable")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    p.add_argument("--plot", help="PNG file: bars per language (one edited run) or Δ against held edits (several)")
    p.add_argument("--plot-metric", default="acc,none", help="the metric,filter key to plot (default acc,none)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        comparison = compare([load_run(path) for path in args.runs], args.metric)
        print(markdown(comparison) if args.format == "markdown" else csv_table(comparison), end="")
        if args.plot:
            print(f"plot: {plot(comparison, args.plot_metric, args.plot)}")
    except ResultsError as err:
        print(f"lm-eval-xke side-effects: error: {err}", file=sys.stderr)
        return 2
    return 0
