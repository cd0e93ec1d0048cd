"""Many independent ROME edits answered by the HF backend one case at a time vs vLLM with one LoRA adapter per edit.

Protocol: the first ``--edits`` English Bi-ZsRE cases (``bizsre_en`` and ``bizsre_en_gen``, rendered by the tasks
exactly as ``lm_eval`` renders them: per case 2 pre-edit and 8 post-edit questions) on a tiny random Llama (or
``--model``), float32 on CPU. ROME's deltas are optimised once, up front, and replayed by both backends through
the ``xke`` model's own scheduling, so the timed part is what differs between them: per case, the HF backend
applies the delta, answers the case's questions in one batch and restores; the vLLM backend answers the pre
questions in one base call and every post question in one call with one LoRA adapter per edit. Both backends are
warmed up on the first case first (the vLLM engine starts there; its start-up is reported apart). Answers are
compared one by one: read-outs by answer, token ids and greediness, generations by text.

    python benchmarks/vllm_lora_throughput.py                                      # 200 edits, both protocols
    python benchmarks/vllm_lora_throughput.py --edits 50 --protocols teacher_forced  # one protocol
    python benchmarks/vllm_lora_throughput.py max_loras=64                           # vLLM engine arguments

Run it with ``nice -n 10`` on a shared machine; vLLM needs the ``[vllm]`` extra (see docs/vllm.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from typing import ClassVar

import torch

#: ROME on a random tiny model: its MLP outputs are tiny, so no decay and a loose clamp (as the tests); few steps,
#: because only the answering is timed and any rank-one update costs vLLM and HF the same to answer
TINY_ROME = {
    "layer": 1,
    "context_template_lengths": [5],
    "context_templates_per_length": 2,
    "clamp_norm_factor": 100.0,
    "v_weight_decay": 0.0,
    "v_num_grad_steps": 5,
}
TASKS = {"teacher_forced": ("bizsre_en", "loglikelihood"), "generate": ("bizsre_en_gen", "generate_until")}


def task_instances(task_name: str, limit: int) -> list:
    """The task's requests for its first ``limit`` docs, built by lm-eval as a run would build them."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict([task_name], TaskManager(include_defaults=False))[task_name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return list(task.instances)


def precomputed_rome(lm, docs: Sequence[dict]) -> tuple[type, float]:
    """An editor class that replays ROME deltas optimised here once per case; and the optimisation's seconds."""
    from lm_eval_xke.cases import EditCase
    from lm_eval_xke.editors import AppliedEdit, Editor, apply_weight_deltas
    from lm_eval_xke.plugins.rome import RomeEditor, RomeHyperParams

    rome = RomeEditor()
    hparams = rome.resolve_hparams(lm.backend.model.config.model_type, overrides=TINY_ROME)
    deltas: dict[tuple, tuple] = {}
    started = time.perf_counter()
    for doc in docs:
        requests = EditCase.from_doc(doc["xke"]).requests
        edit = rome.apply(lm.backend.model, lm.backend.tokenizer, requests, hparams)
        deltas[tuple(requests)] = edit.deltas
        edit.restore()
    seconds = time.perf_counter() - started

    class PrecomputedRome(Editor):
        """ROME's deltas for these cases, optimised once and replayed."""

        name: ClassVar[str] = "rome_precomputed"
        hparams_class = RomeHyperParams

        def apply(self, model, tokenizer, requests, hparams) -> AppliedEdit:
            return apply_weight_deltas(model, deltas[tuple(requests)])

    return PrecomputedRome, seconds


def same_answer(ours, theirs) -> bool:
    if isinstance(theirs, str):
        return ours == theirs
    return ours[1] == theirs[1] and json.loads(ours[2]) == json.loads(theirs[2]) and abs(ours[0] - theirs[0]) < 1e-3


def timed(lm, method: str, instances: list) -> tuple[list, float]:
    started = time.perf_counter()
    answers = getattr(lm, method)(instances)
    return answers, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=200, help="number of English Bi-ZsRE cases (default 200)")
    parser.add_argument("--model", default=None, help="model folder (default: a tiny random Llama)")
    # one thread is the HF backend's best on a tiny model: on a busy 2-core machine a second OpenMP thread mostly
    # waits for the first (measured here: 1.8 s with one thread, 48 s with two, for the same 50 cases)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the HF backend (default 1)")
    parser.add_argument("--protocols", default="teacher_forced,generate", help="comma-separated protocols")
    parser.add_argument("engine_args", nargs="*", help="vLLM engine arguments as name=value")
    args = parser.parse_args()

    from lm_eval.utils import simple_parse_args_string

    from lm_eval_xke.backends.vllm_engine import vllm_distribution
    from lm_eval_xke.editors import register_editor
    from lm_eval_xke.model import XKELM
    from lm_eval_xke.testing import save_tiny_model

    torch.set_num_threads(args.threads)
    engine_args = simple_parse_args_string(",".join(args.engine_args))
    model = args.model or str(save_tiny_model(tempfile.mkdtemp(prefix="xke-tiny-llama-"), "llama"))
    # no journal: a repeated run would answer from it and time nothing
    common = {"pretrained": model, "dtype": "float32", "device": "cpu", "journal": "off"}
    protocols = args.protocols.split(",")
    instances = {p: task_instances(TASKS[p][0], args.edits) for p in protocols}
    docs = {inst.doc_id: inst.doc for inst in next(iter(instances.values()))}

    hf = XKELM(editor="none", backend="hf", **common)
    editor_cls, rome_seconds = precomputed_rome(hf, list(docs.values()))
    register_editor(editor_cls.name, editor_cls)
    hf = XKELM(editor=editor_cls.name, backend="hf", **common)
    vllm = XKELM(editor=editor_cls.name, backend="vllm", **common, **engine_args)

    first_case = {p: [i for i in instances[p] if i.doc_id == min(docs)] for p in protocols}
    started = time.perf_counter()
    for p in protocols:
        getattr(vllm, TASKS[p][1])(first_case[p])  # the engine starts here, sized for ROME's rank-one adapters
    warm_up = time.perf_counter() - started
    for p in protocols:
        getattr(hf, TASKS[p][1])(first_case[p])

    distribution, version = vllm_distribution()
    print(f"model {model}, float32, CPU, HF side {torch.get_num_threads()} threads, {distribution}=={version}")
    print(f"{len(docs)} ROME edits optimised up front: {rome_seconds:.1f} s ({rome_seconds / len(docs):.2f} s/edit)")
    print(f"vLLM engine start + first case: {warm_up:.1f} s (not in the timings below)")
    print(json.dumps(vllm.get_model_info()["xke"]["backend_settings"]["engine_args"]))
    print()
    print("| protocol | questions | HF, one case at a time (s) | vLLM, LoRA batch (s) | speed-up | same answers |")
    print("|---|---|---|---|---|---|")
    for p in protocols:
        method = TASKS[p][1]
        hf_answers, hf_seconds = timed(hf, method, instances[p])
        vllm_answers, vllm_seconds = timed(vllm, method, instances[p])
        same = sum(same_answer(a, b) for a, b in zip(vllm_answers, hf_answers, strict=True))
        print(
            f"| {p} | {len(instances[p])} | {hf_seconds:.2f} | {vllm_seconds:.2f} | "
            f"{hf_seconds / vllm_seconds:.1f}x | {same}/{len(hf_answers)} |"
        )
    print()
    print("vLLM routes:", json.dumps(vllm.get_model_info()["xke"]["backend_settings"]["answered_per_route"]))


if __name__ == "__main__":
    main()
