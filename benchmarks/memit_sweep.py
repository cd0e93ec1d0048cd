"""MEMIT's spread settings (edited layers, lambda) on batches of English Bi-ZsRE edits, values computed once.

MEMIT optimises each request's value vector at the LAST edited layer on the unedited model; which earlier layers
share the update and how strongly the corpus keys hold it back (``lambda_per_width``) only change the spread. So
this sweep registers a MEMIT whose values are memoised per request: the first configuration pays for the value
optimisation, every further one costs a spread and an evaluation. Each configuration is one ``edit_mode=batch``
call of all the cases through the ``xke`` model (answers before the edit, the batch edit, answers after, restore),
scored by the task's own ``process_results``: teacher-forced EM and harmonic F1, in %, English questions.
``--batch-size`` splits the cases into batches (1: every case edited alone). "left" is the residual MEMIT did not
write: per edit ``||z - h_L||`` after the spread over ``||z - h_L||`` before it (``AppliedEdit.info``), mean over
the edits.

    python benchmarks/memit_sweep.py --n-edits 100 --grid "4|5|6|7|8:0.3,1.36" "2|3|4|5|6|7|8:0.3,1.36"
    python benchmarks/memit_sweep.py --n-edits 10 --batch-size 1 --grid "4|5|6|7|8:1.36,0.3"

``--values FILE`` keeps the optimised values on disk (written after each configuration, read back when the model and
the overrides match), so a later sweep over other lambdas or earlier layers skips the expensive part, and a killed
sweep loses at most the configuration it was in.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rome_smollm2 import ROLES, bizsre_instances, case_results, data_dir

from lm_eval_xke.editing.model_state import evaluating
from lm_eval_xke.editors import register_editor
from lm_eval_xke.plugins.memit import MemitEditor
from lm_eval_xke.plugins.rome.compute_v import compute_values
from lm_eval_xke.stats import torch_save_atomic

SWEEP_EDITOR = "memit_sweep"


class MemoisedValuesMemit(MemitEditor):
    """MEMIT that optimises a request's value vector once per process and reuses it in later configurations."""

    name = SWEEP_EDITOR
    values: dict = {}  # (subject, prompt, target, last layer) -> ValueSolution, shared by every instance
    residual_left: list[float] = []  # per edit of the current configuration

    def apply(self, model, tokenizer, requests, hparams):
        hp = self.check_hparams(model, hparams)
        keys = [(r.subject, r.prompt, r.target_new, hp.layers[-1]) for r in requests]
        with evaluating(model):
            templates = self.context_templates(model, tokenizer, hp)
            missing = {k: r for k, r in zip(keys, requests, strict=True) if k not in self.values}
            if missing:
                last = model.get_submodule(hp.module_names()[-1])
                solved = compute_values(model, tokenizer, last, list(missing.values()), templates, hp)
                self.values.update(zip(missing, solved, strict=True))
        edit = self.spread(model, tokenizer, requests, [self.values[k] for k in keys], templates, hp, 0.0)
        self.residual_left.extend(edit.info["residual_left"])
        return edit


class ValuesFile:
    """``--values``: the memoised values on disk, for the model and overrides they were optimised with."""

    def __init__(self, path: str, setting: dict) -> None:
        self.path, self.setting = Path(path), setting
        if self.path.is_file():
            saved = torch.load(self.path, weights_only=False)
            if saved["setting"] != setting:
                raise SystemExit(f"--values {path} holds values of {saved['setting']}, not {setting}: use another file")
            MemoisedValuesMemit.values.update(saved["values"])
            print(f"{len(saved['values'])} optimised values read from {path}")

    def save(self) -> None:
        payload = {"setting": self.setting, "values": MemoisedValuesMemit.values}
        torch_save_atomic(payload, self.path)


def parse_grid(entries: list[str]) -> list[tuple[str, float]]:
    """``"4|5|6|7|8:0.3,1.36"`` -> [("4|5|6|7|8", 0.3), ("4|5|6|7|8", 1.36)]."""
    grid = []
    for entry in entries:
        layers, _, lambdas = entry.partition(":")
        if not lambdas:
            raise SystemExit(f"--grid entry {entry!r}: expected LAYERS:LAMBDA[,LAMBDA...], e.g. '4|5|6|7|8:0.3,1.36'")
        grid += [(layers, float(value)) for value in lambdas.split(",")]
    return grid


def main() -> None:
    from lm_eval_xke import offline_models
    from lm_eval_xke.model import XKELM
    from lm_eval_xke.tasks.bizsre.utils import load_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-edits", type=int, default=100, help="English Bi-ZsRE records (default 100)")
    parser.add_argument("--batch-size", type=int, default=None, help="edits per MEMIT call (default: all at once)")
    parser.add_argument("--grid", nargs="+", required=True, help="LAYERS:LAMBDA_PER_WIDTH[,...] entries")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, prepared offline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="MEMIT hyper-parameter, all runs")
    parser.add_argument("--values", default=None, help="file of optimised values to reuse and extend (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_editor(SWEEP_EDITOR, MemoisedValuesMemit)

    model = args.model or str(offline_models.prepare("smollm2-135m-instruct"))
    docs = load_dataset(xke_edit_lang="en", xke_protocol="teacher_forced", xke_data_file=data_dir())["test"]
    instances = [inst for i in range(args.n_edits) for inst in bizsre_instances(docs[i], i)]
    batch_size = args.batch_size or args.n_edits
    print(
        f"MEMIT, {args.n_edits} English Bi-ZsRE edits in batches of {batch_size}, {model}, float32, "
        f"{args.threads} thread(s), "
        f"overrides {args.overrides}; teacher-forced EM / harmonic F1 in % on the English questions (the task's "
        "process_results); seconds: wall-clock of the batch (answers before, edit, answers after; the first row "
        "also optimises the values); left: ||z - h_L|| after the spread / before it, mean over the edits"
    )
    roles = " ".join(f"{r[:3] + ' EM/F1':>12}" for r in ROLES)
    print(f"{'layers':<22} {'lambda/width':>12} {'seconds':>8} {roles} {'left':>5}")
    overrides = dict(o.split("=", 1) for o in args.overrides)
    values = ValuesFile(args.values, {"model": model, "overrides": overrides}) if args.values else None
    for layers, per_width in parse_grid(args.grid):
        lm = XKELM(
            pretrained=model,
            dtype="float32",
            device="cuda" if torch.cuda.is_available() else "cpu",
            editor=SWEEP_EDITOR,
            edit_mode="batch",
            edit_batch_size=batch_size,
            journal="off",
            layers=layers,
            lambda_per_width=per_width,
            **overrides,
        )
        MemoisedValuesMemit.residual_left = []
        started = time.perf_counter()
        answers = lm.loglikelihood(instances)
        seconds = time.perf_counter() - started
        results = case_results(docs, instances, answers).values()
        cells = []
        for role in ROLES:
            em = 100 * statistics.mean(r[f"{role}_en_em"] for r in results)
            f1 = 100 * statistics.mean(r[f"{role}_en_f1"] for r in results)
            cells.append(f"{em:5.0f}/{f1:5.1f}")
        left = statistics.mean(MemoisedValuesMemit.residual_left)
        row = f"{layers:<22} {per_width:12.2f} {seconds:8.0f} " + " ".join(f"{c:>12}" for c in cells)
        print(f"{row} {left:5.2f}", flush=True)
        if values is not None:
            values.save()
    values = list(MemoisedValuesMemit.values.values())
    print(
        f"values: {sum(v.plain_right for v in values)} of {len(values)} make the bare prompt state the whole target "
        f"(argmax, at the last edited layer, before any spread); median {statistics.median(v.steps for v in values)} "
        "optimisation steps"
    )


if __name__ == "__main__":
    main()
