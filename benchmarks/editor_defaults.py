"""Does every registered editor run with its defaults on every model shape? The table of editor x shape.

Protocol: tiny random models (``lm_eval_xke.testing``: byte-level tokenizer, hidden size 64) of the shapes users
meet: Llama-shaped with 4, 10, 16 and 32 blocks, and Qwen2, Gemma3 (``gemma3_text``) and GPT-2 with 4 blocks. Each
editor runs through the stock ``lm_eval`` CLI with nothing but ``editor=<name>,pretrained=<folder>`` on
``bizsre_en --limit 1`` (one edit case, real Bi-ZsRE data from ``XKE_DATA_DIR``). A cell is ``yes`` when lm_eval
exits 0, else the CLI's own one-line error. The layers each run resolved are read back from
``config.xke.hparams`` (``layer`` / ``layers``). Random models say nothing about edit quality: this measures only
whether the defaults fit the model.

    python benchmarks/editor_defaults.py                       # every editor, every shape
    python benchmarks/editor_defaults.py --editors rome,memit --shapes llama4,gpt2 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lm_eval_xke.editors import available_editors
from lm_eval_xke.testing import save_tiny_model

#: shape name -> (architecture, number of blocks)
SHAPES = {
    "llama4": ("llama", 4),
    "llama10": ("llama", 10),
    "llama16": ("llama", 16),
    "llama32": ("llama", 32),
    "qwen2": ("qwen2", 4),
    "gemma3": ("gemma3", 4),
    "gpt2": ("gpt2", 4),
}


def run_one(editor: str, model_dir: Path, out_dir: Path) -> tuple[str, str]:
    """``(cell, resolved layers)`` of one stock-CLI run with the editor's defaults."""
    cmd = [
        sys.executable, "-m", "lm_eval", "--tasks", "bizsre_en", "--limit", "1", "--model", "xke",
        "--model_args", f"editor={editor},pretrained={model_dir}", "--output_path", str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "XKE_JOURNAL_DIR": str(out_dir / "journals"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error:" in line.lower()]
        return "no: " + (errors[-1].split("error:", 1)[-1].strip() if errors else f"exit {proc.returncode}"), ""
    results = sorted(out_dir.rglob("results_*.json"))
    hparams = json.loads(results[-1].read_text())["config"]["xke"]["hparams"] if results else {}
    layers = {k: hparams[k] for k in ("layer", "layers") if k in hparams}
    return "yes", json.dumps(layers).replace('"', "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editors", default=",".join(available_editors()))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--jobs", type=int, default=2, help="CLI runs at once")
    args = parser.parse_args()
    editors, shapes = args.editors.split(","), args.shapes.split(",")
    root = Path(tempfile.mkdtemp(prefix="xke-defaults-"))
    dirs = {s: save_tiny_model(root / s, SHAPES[s][0], num_layers=SHAPES[s][1]) for s in shapes}
    jobs = [(e, s) for e in editors for s in shapes]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = pool.map(lambda job: run_one(job[0], dirs[job[1]], root / "out" / "_".join(job)), jobs)
        cells = dict(zip(jobs, runs, strict=True))
    print(f"editor x shape, stock lm_eval CLI, editor defaults, bizsre_en --limit 1 ({root})\n")
    print("| editor | " + " | ".join(shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for e in editors:
        print(f"| {e} | " + " | ".join(cells[(e, s)][0] for s in shapes) + " |")
    print("\nresolved layers (config.xke.hparams) of the runs that finished:\n")
    for e in editors:
        resolved = [f"{s} {cells[(e, s)][1]}" for s in shapes if cells[(e, s)][1] not in ("", "{}")]
        if resolved:
            print(f"- {e}: " + "; ".join(resolved))
    ok = sum(cell.startswith("yes") for cell, _ in cells.values())
    print(f"\n{ok} of {len(cells)} runs finished with the defaults")


if __name__ == "__main__":
    main()
