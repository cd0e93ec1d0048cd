"""Edits per second of ROME on SmolLM2-135M-Instruct: the reference toolkit's way, the profiled path, and batches.

One run, same model and the same English Bi-ZsRE records for every configuration; each configuration runs in its own
process, so that its peak memory is its own:

- ``naive``: what the reference toolkits do per edit: context prefixes sampled again for every edit
  (``reuse_context_templates=false``), every value step on the full prompts (``v_prefix_cache=false``), all
  ``v_num_grad_steps`` steps (``early_stop_loss=0``: the mean NLL is never below 0);
- ``profiled``: the defaults (prefixes sampled once per model, KV-cached prefixes, early stop);
- ``ctx6``: the defaults with MEMIT's six context prefixes (the bare prompt + 5 of 10 tokens) instead of ROME's 21:
  the remaining lever on a CPU, where the value optimisation's matrix multiplies are most of the time; its quality
  columns say what it costs;
- ``batched-B``: the defaults with ``edit_parallel=B`` and ``v_batch_size=B``: B cases' value optimisations share
  one forward/backward per step, then each case is applied, answered and restored on its own.

Every configuration answers every question of each case (pre, edit, post, restore) through the ``xke`` model, as
``lm_eval --tasks bizsre_en`` does; edits/s is cases / wall-clock seconds of that loop (model loading and, except
for ``naive``, the once-per-model context prefixes are timed apart). Reliability, generality and locality EM come
from the task's own ``process_results``, so a speed-up that costs quality shows. Peak memory: the process's peak
resident set (CPU) or ``torch.cuda.max_memory_allocated`` (GPU). ``CPU s``: this process's CPU seconds per case (all
threads), steadier than the wall clock on a machine shared with other jobs.

    python benchmarks/edit_throughput.py --n-edits 16
    python benchmarks/edit_throughput.py --n-edits 64 --batch-sizes 4 16 64 --threads 2
    python benchmarks/edit_throughput.py --n-edits 8 --configs profiled batched-4 --set v_num_grad_steps=40
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from rome_smollm2 import ROLES, bizsre_instances, case_results, data_dir

NAIVE = {"reuse_context_templates": "false", "v_prefix_cache": "false", "early_stop_loss": "0"}
SIX_PREFIXES = {"context_template_lengths": "10", "context_templates_per_length": "5"}


def configurations(batch_sizes: list[int]) -> dict[str, tuple[dict[str, str], int]]:
    """Name -> (ROME hyper-parameters, edit_parallel)."""
    configs = {"naive": (NAIVE, 1), "profiled": ({}, 1), "ctx6": (SIX_PREFIXES, 1)}
    configs.update({f"batched-{b}": ({"v_batch_size": str(b)}, b) for b in batch_sizes})
    return configs


def run_one(name: str, args: argparse.Namespace) -> dict:
    """One configuration in this process: every case through the ``xke`` model; timings, EM and peak memory."""
    from lm_eval_xke import offline_models
    from lm_eval_xke.model import XKELM
    from lm_eval_xke.tasks.bizsre.utils import load_dataset

    torch.set_num_threads(args.threads)
    hparams, parallel = configurations(args.batch_sizes)[name]
    overrides = {**dict(o.split("=", 1) for o in args.overrides), **hparams}
    model = args.model or str(offline_models.prepare("smollm2-135m-instruct"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = XKELM(
        pretrained=model,
        dtype="float32",
        device=device,
        editor="rome",
        journal="off",
        edit_parallel=parallel,
        **overrides,
    )
    started = time.perf_counter()
    lm.editor.context_templates(lm.backend.model, lm.backend.tokenizer, lm.hparams)
    template_seconds = time.perf_counter() - started
    docs = load_dataset(xke_edit_lang="en", xke_protocol="teacher_forced", xke_data_file=data_dir())["test"]
    indices = range(args.start, args.start + args.n_edits)
    instances = [inst for i in indices for inst in bizsre_instances(docs[i], i)]

    started, cpu_started = time.perf_counter(), time.process_time()
    answers = lm.loglikelihood(instances)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    results = case_results(docs, instances, answers)
    scores = {role: [results[i][f"{role}_en_em"] for i in indices] for role in ROLES}
    info = lm.get_model_info()["xke"]
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    )
    return {
        "config": name,
        "edits_per_s": args.n_edits / seconds,
        "seconds_per_case": seconds / args.n_edits,
        "cpu_seconds_per_case": cpu_seconds / args.n_edits,
        "edit_seconds_mean": info["edit_seconds_mean"],
        "template_seconds": template_seconds,
        "peak_mb": peak_mb,
        "device": device,
        **{role: statistics.mean(values) for role, values in scores.items()},
    }


def print_table(rows: list[dict]) -> None:
    by_name = {r["config"]: r for r in rows}
    naive, profiled = by_name.get("naive"), by_name.get("profiled")
    print(
        f"{'config':<12} {'edits/s':>8} {'s/case':>7} {'CPU s':>7} {'edit s':>7} {'x naive':>8} {'x prof.':>8} "
        f"{'peak MB':>8} {'rel':>5} {'gen':>5} {'loc':>5}"
    )
    for r in rows:
        ratio_naive = f"{r['edits_per_s'] / naive['edits_per_s']:.2f}" if naive else "-"
        ratio_profiled = f"{r['edits_per_s'] / profiled['edits_per_s']:.2f}" if profiled else "-"
        print(
            f"{r['config']:<12} {r['edits_per_s']:8.3f} {r['seconds_per_case']:7.2f} {r['cpu_seconds_per_case']:7.2f} "
            f"{r['edit_seconds_mean']:7.2f} "
            f"{ratio_naive:>8} {ratio_profiled:>8} {r['peak_mb']:8.0f} "
            f"{r['reliability']:5.2f} {r['generality']:5.2f} {r['locality']:5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-edits", type=int, default=16, help="English Bi-ZsRE records (default 16)")
    parser.add_argument("--start", type=int, default=0, help="first record (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64], help="edit_parallel values")
    parser.add_argument("--configs", nargs="+", default=None, help="only these (naive, profiled, batched-B)")
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, prepared offline)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one configuration, JSON out
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="ROME hyper-parameter for every configuration"
    )
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args)))
        return

    names = args.configs or list(configurations(args.batch_sizes))
    print(
        f"{args.n_edits} English Bi-ZsRE records from {args.start}, {args.threads} threads, overrides {args.overrides}"
    )
    rows = []
    for name in names:
        command = [sys.executable, __file__, "--run", name, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:  # e.g. killed for memory: say so and go on with the other configurations
            print(f"  {name}: failed (exit {done.returncode}): {done.stderr.strip()[-300:]}", flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {name}: {rows[-1]['edits_per_s']:.3f} edits/s", flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
