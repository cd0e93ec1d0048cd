"""Seconds per ordinary request with an edit set held (``edit_set=``) vs on the unedited model, HF backend.

Both models answer the same loglikelihood requests: every (question, choice) pair of ``tests/tasks/mc_facts`` in its
five languages, as lm-eval's multiple-choice scoring asks them (80 questions x 4 choices = 320 requests), through the
``xke`` model's ``loglikelihood`` with lm-eval's HFLM batching (``--batch-size``). Passes alternate between the two
models; the figure is the median pass over ``--repeats`` passes each, after one warm-up pass each. The edited model
is edited in place, so the ratio should be 1 within timing noise: the target is within 10%.

    python benchmarks/held_edit_speed.py --pretrained DIR --edit-set bizsre_zh:10 --set editor=memit \\
        --set mom2_n_tokens=20000
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

from lm_eval.api.instance import Instance

from lm_eval_xke.model import XKELM

TASK_FOLDER = Path(__file__).resolve().parent.parent / "tests" / "tasks" / "mc_facts"
LANGS = ("en", "zh", "fr", "de", "ja")


def mc_facts_requests() -> list[Instance]:
    spec = importlib.util.spec_from_file_location("mc_facts_utils", TASK_FOLDER / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    requests = []
    for lang in LANGS:
        for doc in utils.load_dataset(lang=lang)["test"]:
            for idx, choice in enumerate(doc["choices"]):
                requests.append(
                    Instance("loglikelihood", doc, (doc["text"], f" {choice}"), idx, (f"mc_facts_{lang}", doc["id"], 1))
                )
    return requests


def timed_pass(lm: XKELM, requests: list[Instance]) -> float:
    started = time.perf_counter()
    lm.loglikelihood(requests)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--edit-set", default="bizsre_zh:10", help="the edit_set model_arg")
    parser.add_argument("--set", action="append", default=[], help="model_arg of the edited model, e.g. editor=memit")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    common = dict(pretrained=args.pretrained, dtype=args.dtype, batch_size=args.batch_size, device="cpu")
    unedited = XKELM(**common)
    edited = XKELM(**common, edit_set=args.edit_set, **dict(item.split("=", 1) for item in args.set))
    held = edited.get_model_info()["xke"]["edit_set"]
    requests = mc_facts_requests()
    times: dict[str, list[float]] = {"unedited": [], "edited": []}
    for lm in (unedited, edited):
        timed_pass(lm, requests)  # warm-up
    for _ in range(args.repeats):
        times["unedited"].append(timed_pass(unedited, requests))
        times["edited"].append(timed_pass(edited, requests))
    per_request = {name: statistics.median(values) / len(requests) for name, values in times.items()}
    print(
        f"{len(requests)} loglikelihood requests (mc_facts, 5 languages), HF backend, {args.dtype}, batch size "
        f"{args.batch_size}; median of {args.repeats} alternating passes after a warm-up"
    )
    print(f"edit set: {held['task']}:{held['count']} ({held['mode']}, {held['n_held']} held, {held['seconds']} s)")
    print("| model | s / request | passes (s) |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {per_request[name]:.4f} | {', '.join(f'{v:.1f}' for v in values)} |")
    print(f"edited / unedited: {per_request['edited'] / per_request['unedited']:.3f}")


if __name__ == "__main__":
    main()
