"""Leaderboard submission bundles: `lm-eval-xke submission RUN -o bundle.zip` and `lm-eval-xke verify bundle.zip`.

A bundle is a zip of one lm-eval run made with ``--log_samples``: ``results.json``, one ``samples/<task>.jsonl``
per task, ``editor.json`` (editor, hyper-parameters, edit mode) and ``manifest.json`` (sha256 of every file, package
versions, data sha256s). ``verify`` recomputes every per-sample score from the logged docs and read-outs or
generations with each task's own ``process_results`` (read from its YAML, so no task family needs code here), every
task aggregate (mean and stderr) from the per-sample values and every group mean from its tasks, and rejects the
bundle at the first number that does not match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from lm_eval_xke.reporting.results import ResultsError, find_results_files, read_results, xke_config

BUNDLE_FORMAT = "lm_eval_xke-submission/1"
PACKAGES = ("lm_eval", "lm_eval_xke", "torch", "transformers", "tokenizers", "datasets")
TOLERANCE = 1e-9


class SubmissionError(ResultsError):
    """A run that cannot be bundled, or a bundle that does not verify; worded for the user."""


# ---------------------------------------------------------------- bundling


def find_run(path: str | Path) -> tuple[Path, dict[str, Path]]:
    """The results file of a run and its samples file per task (same timestamp, same folder)."""
    candidates = find_results_files([path])
    if len(candidates) != 1:
        listing = "\n  ".join(map(str, candidates))
        raise SubmissionError(f"{path} must hold exactly one results_*.json; found:\n  {listing}\npass one file")
    path = candidates[0]
    stamp = path.stem.removeprefix("results_")
    results = read_results(path)
    samples = {}
    for task in results.get("configs") or {}:
        found = path.parent / f"samples_{task}_{stamp}.jsonl"
        if not found.is_file():
            raise SubmissionError(f"no per-sample log {found.name} next to {path}: rerun with --log_samples")
        samples[task] = found
    return path, samples


def make_bundle(run: str | Path, out: str | Path) -> Path:
    """Write the bundle of the run at ``run`` (a results file or its folder) to ``out``; it is verified first."""
    results_path, sample_paths = find_run(run)
    results = read_results(results_path)
    xke = _xke_config(results)
    files = {"results.json": results_path.read_bytes()}
    files.update({f"samples/{task}.jsonl": p.read_bytes() for task, p in sample_paths.items()})
    editor = {k: xke.get(k) for k in ("editor", "hparams", "edit_mode", "edit_batch_size", "seed", "backend")}
    files["editor.json"] = _dump(editor)
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "samples": {task: f"samples/{task}.jsonl" for task in sample_paths},
        "data": xke.get("data", []),
        "limit": (results.get("config") or {}).get("limit"),
        "packages_run": {k: results.get(k) for k in ("lm_eval_version", "transformers_version")},
        "packages_bundle": package_versions(xke.get("editor")),
        "sha256": {name: _sha256(data) for name, data in files.items()},
    }
    check_bundle_contents(manifest, files)
    out = Path(out)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in {"manifest.json": _dump(manifest), **files}.items():
            zf.writestr(name, data)
    return out


def package_versions(editor: str | None) -> dict[str, str]:
    """Versions of the packages that shape the numbers, the editor's own distribution included."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    for ep in metadata.entry_points(group="lm_eval_xke.editors"):
        if ep.name == editor and ep.dist is not None:
            versions[f"editor:{ep.dist.name}"] = ep.dist.version
    return versions


# ---------------------------------------------------------------- verifying


def verify_bundle(path: str | Path) -> list[str]:
    """Check the bundle at ``path``; return what was checked, or raise :class:`SubmissionError`."""
    try:
        with zipfile.ZipFile(path) as zf:
            files = {name: zf.read(name) for name in zf.namelist()}
    except (OSError, zipfile.BadZipFile) as err:
        raise SubmissionError(f"{path} is not a readable zip file: {err}") from None
    if "manifest.json" not in files:
        raise SubmissionError(f"{path} has no manifest.json: make bundles with `lm-eval-xke submission`")
    manifest = json.loads(files.pop("manifest.json"))
    return check_bundle_contents(manifest, files)


def check_bundle_contents(manifest: dict, files: dict[str, bytes]) -> list[str]:
    if manifest.get("format") != BUNDLE_FORMAT:
        raise SubmissionError(f"unknown bundle format {manifest.get('format')!r}; expected {BUNDLE_FORMAT}")
    _check_checksums(manifest.get("sha256") or {}, files)
    results = json.loads(files["results.json"])
    samples = {task: _read_jsonl(files[name], name) for task, name in manifest["samples"].items()}
    _check_provenance(manifest, results, json.loads(files["editor.json"]), samples)
    report = [f"{len(files)} files match their sha256"]
    scorers = task_scorers(results, list(samples))
    report += [_check_task(task, results, rows, scorers.get(task)) for task, rows in samples.items()]
    report += _check_groups(results)
    return report


def _check_checksums(expected: dict[str, str], files: dict[str, bytes]) -> None:
    if set(expected) != set(files):
        raise SubmissionError(
            f"bundle files {sorted(files)} differ from the manifest's {sorted(expected)}: the bundle was altered"
        )
    for name, data in files.items():
        if _sha256(data) != expected[name]:
            raise SubmissionError(f"{name} does not match its sha256 in the manifest: the bundle was altered")


def _check_provenance(manifest: dict, results: dict, editor: dict, samples: dict[str, list[dict]]) -> None:
    xke = _xke_config(results)
    if editor.get("hparams") != xke.get("hparams") or editor.get("editor") != xke.get("editor"):
        raise SubmissionError("editor.json disagrees with the editor and hyper-parameters in results.json")
    if manifest.get("data") != xke.get("data"):
        raise SubmissionError("the manifest's data files and sha256s disagree with results.json")
    known = {d.get("sha256") for d in xke.get("data", [])}
    for task, rows in samples.items():
        for row in rows:
            sha = ((row.get("doc") or {}).get("xke") or {}).get("source", {}).get("sha256")
            if sha is not None and sha not in known:
                raise SubmissionError(f"{task} doc {row.get('doc_id')} comes from data sha256 {sha}, not {known}")


def _check_task(task: str, results: dict, rows: list[dict], scorer: Callable | None) -> str:
    values = (results.get("results") or {}).get(task)
    if values is None:
        raise SubmissionError(f"results.json has no scores for {task}, but the bundle has its samples")
    effective = ((results.get("n-samples") or {}).get(task) or {}).get("effective")
    docs = {row["doc_id"] for row in rows}
    if effective is not None and len(docs) != effective:
        raise SubmissionError(f"{task}: results.json counts {effective} samples, the log has {len(docs)}")
    recomputed = sum(_check_sample(task, row, scorer) for row in rows) if scorer else 0
    checked = 0
    for key, reported in values.items():
        metric, _, filt = key.partition(",")
        if not filt or not isinstance(reported, (int, float)) or metric.endswith("_stderr"):
            continue
        per_sample = [float(row[metric]) for row in rows if row.get("filter") == filt and metric in row]
        if len(per_sample) != len(docs):
            raise SubmissionError(f"{task}: {metric} is missing from some per-sample records")
        _expect(f"{task} {metric}", sum(per_sample) / len(per_sample), reported)
        stderr = values.get(f"{metric}_stderr,{filt}")
        if isinstance(stderr, (int, float)) and len(per_sample) > 1:
            _expect(f"{task} {metric}_stderr", _stderr(per_sample), stderr)
        checked += 1
    return f"{task}: {len(docs)} samples, {recomputed} per-sample scores recomputed, {checked} aggregates match"


def _check_groups(results: dict) -> list[str]:
    report = []
    scores = results.get("results") or {}
    for group, tasks in (results.get("group_subtasks") or {}).items():
        if group not in scores or not tasks:
            continue
        sizes = [scores[t].get("sample_len") or 0 for t in tasks]
        for key, reported in scores[group].items():
            if "," not in key or "_stderr" in key or not isinstance(reported, (int, float)):
                continue
            values = [scores[t][key] for t in tasks]
            weighted = sum(v * n for v, n in zip(values, sizes, strict=True)) / max(sum(sizes), 1)
            if not math.isclose(weighted, reported, abs_tol=TOLERANCE):
                _expect(f"group {group} {key}", sum(values) / len(values), reported)
        report.append(f"group {group}: means of {', '.join(tasks)} match")
    return report


@cache
def _task_index() -> dict:
    """lm-eval's index of every task it knows (ours included through the start-up hook); built once per process,
    since indexing lm-eval's thousands of YAMLs takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def task_scorers(results: dict, tasks: list[str]) -> dict[str, Callable]:
    """Each task's own ``process_results``, read from its YAML the way lm-eval reads it: the YAML that lm-eval's task
    index (ours included) holds for the task's name, else the ``config_source`` the run recorded (a task of the
    user's own ``--include_path`` folder, verified where that folder is). Tasks scored by lm-eval's built-in metrics
    have none: their aggregates are still checked against the per-sample values."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own YAML loader (resolves !function and include)

    index = _task_index()
    scorers: dict[str, Callable] = {}
    for task in tasks:
        entry = index.get(task)
        recorded = (((results.get("configs") or {}).get(task) or {}).get("metadata") or {}).get("config_source")
        path = getattr(entry, "yaml_path", None) or (recorded if recorded and Path(recorded).is_file() else None)
        if path is None:
            continue
        function = load_yaml(path, resolve_func=True).get("process_results")
        if callable(function):
            scorers[task] = function
    return scorers


def _check_sample(task: str, row: dict, scorer: Callable) -> int:
    """Recompute one sample's scores with the task's own scorer; return how many were checked."""
    try:
        scores = scorer(row.get("doc") or {}, row["filtered_resps"])
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise SubmissionError(f"{task} doc {row.get('doc_id')}: the logged answers cannot be scored ({err})") from None
    for key, value in scores.items():
        if key not in row:
            raise SubmissionError(f"{task} doc {row.get('doc_id')}: {key} is missing from the per-sample record")
        _expect(f"{task} doc {row.get('doc_id')} {key}", value, row[key])
    return len(scores)


def _stderr(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))


def _expect(what: str, recomputed: float, reported: Any) -> None:
    if not isinstance(reported, (int, float)) or not math.isclose(recomputed, reported, abs_tol=TOLERANCE):
        raise SubmissionError(
            f"{what}: the bundle reports {reported!r} but the per-sample records give {recomputed!r}; "
            "the bundle was altered or is inconsistent, so it is rejected"
        )


# ---------------------------------------------------------------- helpers


def _xke_config(results: dict) -> dict:
    xke = xke_config(results)
    if xke is None:
        raise SubmissionError("results.json was not made with --model xke (no config.xke)")
    return xke


def _read_jsonl(data: bytes, name: str) -> list[dict]:
    try:
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubmissionError(f"{name} is not valid JSON lines: {err}") from None


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- CLI


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """``submission`` and ``verify`` (one module, both commands)."""
    p = sub.add_parser("submission", help="bundle one run (made with --log_samples) for a leaderboard submission")
    p.add_argument("run", help="the run's results_*.json, or the folder holding it")
    p.add_argument("-o", "--out", required=True, help="bundle file to write (.zip)")
    p.set_defaults(func=_run_submission)
    v = sub.add_parser("verify", help="recompute every number of a submission bundle; exit 1 if any differs")
    v.add_argument("bundle")
    v.set_defaults(func=_run_verify)


def _run_submission(args: argparse.Namespace) -> int:
    try:
        out = make_bundle(args.run, args.out)
    except ResultsError as err:
        print(f"lm-eval-xke submission: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (verified)")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    try:
        report = verify_bundle(args.bundle)
    except ResultsError as err:
        print(f"lm-eval-xke verify: REJECTED {args.bundle}: {err}", file=sys.stderr)
        return 1
    print("\n".join([f"OK {args.bundle}", *(f"  {line}" for line in report)]))
    return 0
