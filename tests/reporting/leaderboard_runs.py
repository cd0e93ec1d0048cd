"""Real tiny-model runs, made once per test session and shared by the leaderboard, submission and plot tests."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

ROME = "editor=rome,layer=1,context_template_lengths=5,context_templates_per_length=5,v_num_grad_steps=5"


def run_specs(model: Path, small_data: Path) -> dict[str, tuple[str, str, str]]:
    """name -> (tasks, model_args, --limit)."""
    return {
        "none": ("bizsre_en,bizsre_zh,bizsre_en_gen", f"pretrained={model},editor=none", "2"),
        "rome": ("bizsre_en,bizsre_zh", f"pretrained={model},{ROME}", "2"),
        "legacy_f1": ("bizsre_en", f"pretrained={model},editor=none,xke_f1=legacy_pr", "1"),
        "other_data": ("bizsre_zh", f"pretrained={model},editor=none,xke_data_file={small_data}", "1"),
    }


@cache
def tiny_runs(model: Path, data_dir: Path, root: Path) -> dict[str, Path]:
    """Output folder of each run (lm-eval's --output_path), keyed by run name.

    The runs go through the CLI's own code path in-process (``simple_evaluate`` with an ``EvaluationTracker``
    that writes the results JSON and samples JSONL), over a TaskManager that indexes only our tasks: a CLI
    subprocess spends most of its ~20 s indexing lm-eval's built-in tasks. ``XKE_TEST_RUNS_CACHE=<folder>``
    keeps the runs there and reuses them (for iterating on these tests).
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    root = Path(os.environ.get("XKE_TEST_RUNS_CACHE") or root)
    root.mkdir(parents=True, exist_ok=True)
    small_data = root / "bizsre_first5.json"
    records = json.loads((data_dir / "bizsre" / "bizsre_test.json").read_text(encoding="utf-8"))
    small_data.write_text(json.dumps(records[:5], ensure_ascii=False), encoding="utf-8")
    os.environ["XKE_DATA_DIR"] = str(data_dir)
    outs = {}
    for name, (tasks, model_args, limit) in run_specs(model, small_data).items():
        outs[name] = root / name
        if any(outs[name].rglob("results_*.json")):
            continue
        tracker = EvaluationTracker(output_path=str(outs[name]))
        args = simple_parse_args_string(f"{model_args},device=cpu")
        # like the CLI, hand the model_args to the tasks as metadata (xke_f1, xke_data_file, ...)
        task_manager = TaskManager(include_defaults=False, metadata=args)
        results = simple_evaluate(
            model="xke",
            model_args=args,
            tasks=tasks.split(","),
            limit=float(limit),
            log_samples=True,
            evaluation_tracker=tracker,
            task_manager=task_manager,
        )
        samples = results.pop("samples")
        tracker.save_results_aggregated(results=results, samples=samples)
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return outs
