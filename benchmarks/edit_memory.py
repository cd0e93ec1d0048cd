"""Peak memory of single-mode editing as the number of edit cases grows: ROME on a tiny model, 20 vs 200 cases.

Each (editor, case count) runs in a fresh subprocess (peak RSS is per process): it loads the tiny model, edits
and answers one warm-up case (imports, ROME's per-model caches), then N synthetic cases through the `xke` model
with the journal on, and reports the peak RSS (``resource.getrusage``) and its growth over the warm-up. Editing
state must not grow with N: the 200-case peak stays within a small margin of the 20-case one. ``editor=none``
answers the same requests unedited: its growth is what holding N cases' requests and answers costs anyway.

    python benchmarks/edit_memory.py [--cases 20 200] [--editors rome none] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

EDITOR_ARGS = {
    "rome": dict(layer=1, v_num_grad_steps=5, context_template_lengths=5, context_templates_per_length=2),
    "none": {},
}


def cases(n: int, first: int = 0) -> list:
    """``n`` synthetic edit cases (one edit, a pre and two post questions each), as lm-eval would request them."""
    from lm_eval.api.instance import Instance

    from lm_eval_xke.cases import EditCase, EditRequest, Question

    requests = []
    for doc_id in range(first, first + n):
        subject, prompt = f"Country{doc_id}", f"The capital of Country{doc_id} is"
        questions = (
            Question("locality", "en", "Water is made of", ("hydrogen",), phase="pre"),
            Question("reliability", "en", prompt, ("Berlin",)),
            Question("locality", "en", "Water is made of", ("hydrogen",)),
        )
        doc = {"xke": EditCase(f"c{doc_id}", (EditRequest(prompt, subject, "Berlin", "en"),), questions).to_doc()}
        requests += [
            Instance("loglikelihood", doc, (q.prompt, " " + q.answers[0]), i, ("memory", doc_id, 1))
            for i, q in enumerate(questions)
        ]
    return requests


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(editor: str, n: int, model_dir: str, journal_dir: str) -> dict:
    from lm_eval_xke.model import XKELM

    lm = XKELM(pretrained=model_dir, device="cpu", journal=journal_dir + "/", editor=editor, **EDITOR_ARGS[editor])
    lm.loglikelihood(cases(1, first=10_000))  # warm-up: imports, context templates, allocator pools
    warm = peak_rss_mib()
    lm.loglikelihood(cases(n))
    peak = peak_rss_mib()
    return {
        "editor": editor,
        "cases": n,
        "warm": round(warm, 1),
        "peak": round(peak, 1),
        "growth": round(peak - warm, 1),
    }


def measure(editor: str, n: int, model_dir: str, tmp: str, threads: int) -> dict:
    """One child process's figures."""
    command = [sys.executable, __file__, "--editor", editor, "--child", str(n), "--model-dir", model_dir]
    command += ["--journal-dir", tempfile.mkdtemp(dir=tmp)]
    out = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--editors", nargs="+", default=["rome", "none"], choices=sorted(EDITOR_ARGS))
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each child")
    parser.add_argument("--editor", help=argparse.SUPPRESS)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--journal-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.editor, args.child, args.model_dir, args.journal_dir)))
        return

    from lm_eval_xke.testing import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_tiny_model(Path(tmp) / "tiny-llama"))
        rows = [measure(e, n, model_dir, tmp, args.threads) for e in args.editors for n in args.cases]
    print(
        "peak resident set (resource.getrusage ru_maxrss) of one subprocess per row: tiny random Llama, single mode, "
        f"journal on, {args.threads} thread(s); growth = peak after N cases - peak after one warm-up case"
    )
    print(f"{'editor':>6} {'cases':>6} {'warm-up peak MiB':>17} {'peak MiB':>9} {'growth MiB':>11}")
    for row in rows:
        print(f"{row['editor']:>6} {row['cases']:>6} {row['warm']:>17} {row['peak']:>9} {row['growth']:>11}")
    for editor in args.editors:
        mine = [r for r in rows if r["editor"] == editor]
        first, last = mine[0], mine[-1]
        print(f"{editor}: peak RSS ratio {last['cases']} / {first['cases']} cases {last['peak'] / first['peak']:.3f}")


if __name__ == "__main__":
    main()
