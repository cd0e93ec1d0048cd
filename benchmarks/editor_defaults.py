"""Does every registered editor run with its defaults on every model shape? The table of editor x shape.

Protocol: tiny random models (``lm_eval_xke.testing``: byte-level tokenizer, hidden size 64) of the shapes users
meet: Llama-shaped with 4, 10, 16 and 32 blocks, and Qwen2, Gemma3 (``gemma3_text``) and GPT-2 with 4 blocks. Each
editor runs with nothing but ``editor=<name>,pretrained=<folder>`` on ``bizsre_en --limit 1`` (one edit case, real
Bi-ZsRE data from ``XKE_DATA_DIR``) through the ``lm_eval`` CLI's own path in this process (``simple_evaluate``
with the parsed model_args string; a CLI subprocess would spend ~15 s per run indexing lm-eval's built-in tasks).
A cell is ``yes`` when the run finished, else the error's first line, as the CLI prints it. The layers each run
resolved are read back from ``config.xke.hparams`` (``layer`` / ``layers``). Random models say nothing about edit
quality: this measures only whether the defaults fit the model.

    python benchmarks/editor_defaults.py                       # every editor, every shape
    python benchmarks/editor_defaults.py --editors rome,memit --shapes llama4,gpt2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from lm_eval_xke.editors import available_editors
from lm_eval_xke.testing import MODEL_SHAPES, save_tiny_model


def run_one(editor: str, model_dir: Path, out_dir: Path) -> tuple[str, str]:
    """``(cell, resolved layers)`` of one run with the editor's defaults."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    os.environ["XKE_JOURNAL_DIR"] = str(out_dir / "journals")
    args = simple_parse_args_string(f"editor={editor},pretrained={model_dir},device=cpu")
    try:
        results = simple_evaluate(
            model="xke", model_args=args, tasks=["bizsre_en"], limit=1.0,
            task_manager=TaskManager(include_defaults=False, metadata=args),
        )  # fmt: skip
    except Exception as err:  # the table reports what the user would see
        return f"no: {type(err).__name__}: {str(err).splitlines()[0]}", ""
    hparams = results["config"]["xke"]["hparams"]
    return "yes", json.dumps({k: hparams[k] for k in ("layer", "layers") if k in hparams}).replace('"', "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editors", default=",".join(available_editors()))
    parser.add_argument("--shapes", default=",".join(MODEL_SHAPES))
    args = parser.parse_args()
    editors, shapes = args.editors.split(","), args.shapes.split(",")
    root = Path(tempfile.mkdtemp(prefix="xke-defaults-"))
    dirs = {s: save_tiny_model(root / s, MODEL_SHAPES[s][0], num_layers=MODEL_SHAPES[s][1]) for s in shapes}
    jobs = [(e, s) for e in editors for s in shapes]
    cells = {job: run_one(job[0], dirs[job[1]], root / "out" / "_".join(job)) for job in jobs}
    print(f"editor x shape, lm_eval's CLI path, editor defaults, bizsre_en --limit 1 ({root})\n")
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
