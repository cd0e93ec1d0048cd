"""Peak memory and time of reading MEMIT's keys for a batch of edits: the whole forward pass vs ``module_io``.

MEMIT reads, per edited layer, the MLP input at the fact token of every edit under every context template (the
bare prompt and 5 prefixes of 10 tokens). Run through the whole model, that pass also computes every block after
the layer and the logits of every position (rows x tokens x vocabulary floats); ``module_io`` stops after the
layer. Each way runs in a fresh process, after one warm-up batch of 2 edits; the figure is the growth of the
process's peak resident memory over the model alone (``ru_maxrss``) and the wall-clock of the pass. The keys of
both ways are compared for equality.

    python benchmarks/key_memory.py --n-edits 100 [--model DIR] [--layer 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def measure(model_dir: str, n_edits: int, layer: int, way: str) -> dict:
    """Run one way in this process and return its figures (called in a fresh subprocess)."""
    import lm_eval_xke.plugins.memit.compute as memit_compute
    from lm_eval_xke.cases import EditCase
    from lm_eval_xke.editing.hooks import trace_module
    from lm_eval_xke.model import XKELM
    from lm_eval_xke.tasks.bizsre.utils import load_dataset

    torch.set_num_threads(2)
    lm = XKELM(pretrained=model_dir, dtype="float32", device="cpu", editor="memit", journal="off")
    model, tokenizer, editor, hp = lm.backend.model, lm.backend.tokenizer, lm.editor, lm.hparams
    templates = editor.context_templates(model, tokenizer, hp)
    module = model.get_submodule(hp.module_template.format(layer))
    docs = load_dataset(xke_edit_lang="en", xke_protocol="teacher_forced")["test"]
    requests = [r for i in range(n_edits) for r in EditCase.from_doc(docs[i]["xke"]).requests]
    if way == "whole":  # the pass before module_io: the whole model, logits included, with the module traced

        def whole(model, module, **inputs):
            with trace_module(module) as record, torch.no_grad():
                model(**inputs)
            return record

        memit_compute.module_io = whole

    def keys_of(batch):
        return memit_compute.compute_ks(model, tokenizer, module, batch, templates, hp.template_groups(), hp.fact_token)

    keys_of(requests[:2])  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    keys = keys_of(requests)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "way": way,
        "rows": len(requests) * len(templates),
        "vocab": model.config.vocab_size,
        "growth_mib": (peak - before) / 1024,
        "seconds": seconds,
        "keys": keys.double().sum().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-edits", type=int, default=100)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, prepared offline)")
    parser.add_argument("--way", choices=("whole", "module_io"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.model, args.n_edits, args.layer, args.way)))
        return
    from lm_eval_xke import offline_models

    model = args.model or str(offline_models.prepare("smollm2-135m-instruct"))
    figures = {}
    for way in ("whole", "module_io"):
        command = [sys.executable, __file__, "--way", way, "--model", model, "--n-edits", str(args.n_edits)]
        done = subprocess.run([*command, "--layer", str(args.layer)], capture_output=True, text=True, check=True)
        figures[way] = json.loads(done.stdout.strip().splitlines()[-1])
    whole, stopped = figures["whole"], figures["module_io"]
    print(
        f"MEMIT keys of {args.n_edits} English Bi-ZsRE edits at layer {args.layer} ({whole['rows']} rows, vocabulary "
        f"{whole['vocab']}), {model}, float32, CPU, 2 threads; peak resident memory growth over the loaded model "
        "(ru_maxrss) and wall-clock of the pass, each way in a fresh process after a 2-edit warm-up"
    )
    for figure in (whole, stopped):
        print(f"{figure['way']:<10} {figure['growth_mib']:9.0f} MiB {figure['seconds']:8.2f} s")
    memory = (
        f"memory ratio {whole['growth_mib'] / stopped['growth_mib']:.1f}x"
        if stopped["growth_mib"] > 0
        else "module_io sets no new peak (its pass fits under the model's own loading peak)"
    )
    ratio = whole["seconds"] / stopped["seconds"]
    print(f"{memory}, time ratio {ratio:.1f}x; keys equal: {whole['keys'] == stopped['keys']}")


if __name__ == "__main__":
    main()
