"""Samples and metrics of a fixed set of runs, to prove that a refactor changes no behaviour.

Every registered editor (with its defaults; MEND and SERAC, which need a trained checkpoint, are listed as skipped)
runs on a tiny random Llama (``lm_eval_xke.testing``, 4 blocks, fixed seed) through lm-eval's own ``simple_evaluate``
over Bi-ZsRE (teacher-forced and generated) and MLaKE (single-hop, multi-hop, multiple choice), two cases each,
English. Per run the snapshot keeps what a user reads: every metric of every task and every sample's responses and
per-sample scores, written as sorted JSON, one file per editor; wall-clock fields are left out.

    python scripts/behaviour_snapshot.py --out /tmp/before          # on the commit before the refactor
    python scripts/behaviour_snapshot.py --out /tmp/after           # after it
    python scripts/behaviour_snapshot.py --compare /tmp/before /tmp/after

``--compare`` prints the files that differ (byte for byte) and exits 1 if any does. Needs the benchmark data in
``XKE_DATA_DIR``; ``--editors`` picks a subset. Torch runs on one CPU thread: the order of float reductions depends
on the thread count, and the trained editors (FT-M, LoRA, GRACE) then differ in the last bits between machines.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import tempfile
from pathlib import Path

TASKS = ("bizsre_en", "bizsre_en_gen", "mlake_en", "mlake_multihop_en", "mlake_mc_en")
LIMIT = 2
#: per-sample fields that are the model's answers and their scores (the rest is the doc and lm-eval's bookkeeping)
SAMPLE_FIELDS = ("doc_id", "resps", "filtered_resps", "filter", "metrics")


def snapshot_run(editor: str, model_dir: Path) -> dict:
    """One editor over every task: metrics per task and the answers and scores of every sample."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(f"editor={editor},pretrained={model_dir},device=cpu,journal=off")
    results = simple_evaluate(
        model="xke",
        model_args=args,
        tasks=list(TASKS),
        limit=float(LIMIT),
        log_samples=True,
        task_manager=TaskManager(include_defaults=False, metadata=args),
    )
    samples = {
        task: [
            {**{k: row.get(k) for k in SAMPLE_FIELDS}, **{m: row.get(m) for m in row.get("metrics") or ()}}
            for row in rows
        ]
        for task, rows in results["samples"].items()
    }
    hparams = results["config"]["xke"]["hparams"]
    return {"editor": editor, "hparams": hparams, "metrics": results["results"], "samples": samples}


def take(out: Path, editors: list[str]) -> None:
    import torch

    from lm_eval_xke.editors import EditorError, available_editors, get_editor
    from lm_eval_xke.testing import save_tiny_model
    from lm_eval_xke.training import is_trainable

    torch.set_num_threads(1)

    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="xke-snapshot-"))
    os.environ["XKE_CACHE_DIR"] = str(scratch / "cache")  # statistics computed afresh, the same way every time
    model_dir = save_tiny_model(scratch / "tiny", "llama")
    for editor in editors or available_editors():
        if is_trainable(get_editor(editor)):
            print(f"{editor}: skipped (needs a trained checkpoint)")
            continue
        try:
            snapshot = snapshot_run(editor, model_dir)
        except EditorError as err:
            snapshot = {"editor": editor, "error": str(err)}
        path = out / f"{editor}.json"
        path.write_text(json.dumps(snapshot, sort_keys=True, ensure_ascii=False, indent=1, default=str))
        print(f"{editor}: {path}")


def compare(before: Path, after: Path) -> int:
    names = sorted({p.name for p in before.glob("*.json")} | {p.name for p in after.glob("*.json")})
    differing = [n for n in names if not (before / n).is_file() or not (after / n).is_file()]
    differing += [n for n in names if n not in differing and not filecmp.cmp(before / n, after / n, shallow=False)]
    for name in names:
        print(f"{'DIFFERS' if name in differing else 'identical'}  {name}")
    print(f"{len(names) - len(differing)} of {len(names)} snapshots byte-identical")
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder to write the snapshot to")
    parser.add_argument("--editors", nargs="*", default=[], help="only these editors (default: every registered one)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("give --out FOLDER or --compare BEFORE AFTER")
    take(args.out, args.editors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
