"""ROME on SmolLM2-135M-Instruct: seconds per edit and teacher-forced EM on English Bi-ZsRE edits.

Protocol: the ``xke`` model (float32, CPU, ``editor=rome`` with the ``llama`` family defaults unless overridden)
answers every question of each Bi-ZsRE case in the test file's order, exactly as ``lm_eval --tasks bizsre_en``
does: locality is asked before the edit, the edit is applied, the post questions are asked, the edit is restored.
EM is the task's own ``process_results`` (reliability/generality: all target tokens argmax-exact under teacher
forcing; locality: the post-edit argmax equals the pre-edit one). Seconds per edit are the editor's
``apply`` wall-clock time as the ``xke`` model records it, seconds per case the whole case end to end (pre
questions, edit, post questions, restore); context templates, sampled once per model, are not counted: they are
reported separately. ``torch.set_num_threads(--threads)``; no journal, so every run edits every case. On a
machine shared with other jobs, the CPU seconds of a case (this process's, all threads) are the steadier measure.

    python benchmarks/rome_smollm2.py 10                       # records 0-9
    python benchmarks/rome_smollm2.py 20 --start 10            # records 10-29
    python benchmarks/rome_smollm2.py 10 v_num_grad_steps=40   # hyper-parameter overrides
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

ROLES = ("reliability", "generality", "locality")


def data_dir() -> str:
    """``XKE_DATA_DIR``, else ``../shared/data`` beside the repository (the CI layout)."""
    found = os.environ.get("XKE_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (Path(found) / "bizsre" / "bizsre_test.json").is_file():
        raise SystemExit(f"Bi-ZsRE data not found in {found}: set XKE_DATA_DIR")
    return found


def bizsre_instances(doc: dict, index: int) -> list[Instance]:
    """The ``loglikelihood`` requests lm-eval builds for one ``bizsre_en`` doc (every question, target first)."""
    return [
        Instance("loglikelihood", doc, (q["prompt"], " " + q["answers"][0]), i, ("bizsre_en", index, 1))
        for i, q in enumerate(doc["xke"]["questions"])
    ]


def case_results(docs, instances: list[Instance], answers: list) -> dict[int, dict[str, float]]:
    """The task's own ``process_results`` per doc index, from the answers to several docs' ``bizsre_instances``."""
    from lm_eval_xke.tasks.bizsre.utils import process_results

    by_doc: dict[int, list] = {}
    for instance, answer in zip(instances, answers, strict=True):
        by_doc.setdefault(instance.doc_id, []).append(answer)
    return {index: process_results(docs[index], mine) for index, mine in by_doc.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, help="number of English Bi-ZsRE records")
    parser.add_argument("--start", type=int, default=0, help="first record (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, prepared offline)")
    parser.add_argument("overrides", nargs="*", help="ROME hyper-parameters as name=value")
    args = parser.parse_args()

    from lm_eval_xke import offline_models
    from lm_eval_xke.model import XKELM
    from lm_eval_xke.tasks.bizsre.utils import load_dataset, process_results

    torch.set_num_threads(args.threads)
    model = args.model or str(offline_models.prepare("smollm2-135m-instruct"))
    overrides = dict(o.split("=", 1) for o in args.overrides)
    lm = XKELM(pretrained=model, dtype="float32", device="cpu", editor="rome", journal="off", **overrides)
    data = data_dir()
    docs = load_dataset(xke_edit_lang="en", xke_protocol="teacher_forced", xke_data_file=data)["test"]

    # the context templates are sampled once per model: time them apart from the per-edit cost
    started = time.perf_counter()
    lm.editor.context_templates(lm.backend.model, lm.backend.tokenizer, lm.hparams)
    template_seconds = time.perf_counter() - started

    scores: dict[str, list[float]] = {f"{role}_en_em": [] for role in ROLES}
    seconds: list[float] = []
    case_seconds: list[float] = []
    cpu_seconds: list[float] = []
    print(f"model {model}, float32, CPU, {torch.get_num_threads()} threads, overrides {overrides or 'none'}")
    print(f"context templates: {template_seconds:.1f} s (once per model)")
    for index in range(args.start, args.start + args.n):
        doc = docs[index]
        instances = bizsre_instances(doc, index)
        before = lm.get_model_info()["xke"]["edit_seconds_total"]
        started, cpu_started = time.perf_counter(), time.process_time()
        results = process_results(doc, lm.loglikelihood(instances))
        case_seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        seconds.append(lm.get_model_info()["xke"]["edit_seconds_total"] - before)
        for name in scores:
            scores[name].append(results[name])
        request = doc["xke"]["requests"][0]
        marks = " ".join(f"{name.split('_')[0][:3]}={results[name]:.0f}" for name in scores)
        timing = f"edit {seconds[-1]:6.2f} s  case {case_seconds[-1]:6.2f} s  cpu {cpu_seconds[-1]:6.2f} s"
        print(f"record {index:4d}  {timing}  {marks}  {request['subject']!r} -> {request['target_new']!r}")

    print(
        f"records {args.start}-{args.start + args.n - 1}: {statistics.mean(seconds):.2f} s per edit "
        f"(median {statistics.median(seconds):.2f}, max {max(seconds):.2f}); "
        f"{statistics.mean(case_seconds):.2f} s per case end to end ({statistics.mean(cpu_seconds):.2f} CPU s)"
    )
    for name, values in scores.items():
        print(f"{name}: {statistics.mean(values):.3f}")


if __name__ == "__main__":
    main()
