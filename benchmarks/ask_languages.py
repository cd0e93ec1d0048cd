"""What asking in more languages costs per edit case: BMIKE-53 zsRE asked in 2, 12 and 53 languages from one edit.

The edit is the expensive part of a case, a question is cheap, so a whole transfer-matrix row (every language asked
after one edit) should cost little more than the paper's pair (English + one language). Protocol: the same BMIKE-53
zsRE records (the first ``--n`` records that have a block in all 53 languages, so every configuration edits the same
facts), edited in English with ``--editor`` (default ROME, family defaults) on SmolLM2-135M-Instruct (float32, CPU
unless CUDA is there), and asked, teacher-forced, in ``en|de`` (2), the 12 MzsRE languages and all 53
(``xke_test_langs``), each configuration's cases through the ``xke`` model's ``loglikelihood`` exactly as
``lm_eval --tasks bmike53_zsre_de`` builds them (pre-edit locality, edit, post questions, restore; no journal).
Seconds per case are wall clock of that loop / cases; CPU seconds (this process, all threads) are the steadier
measure on a shared machine; the editor's own seconds are reported apart. Context templates (once per model) are
sampled before any timing.

    python benchmarks/ask_languages.py --n 5
    python benchmarks/ask_languages.py --n 10 --editor memit --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lm_eval.api.instance import Instance
from rome_smollm2 import data_dir

MZSRE_SET = "en|cs|de|nl|es|fr|pt|ru|th|tr|vi|zh"
CONFIGS = {"2": "en|de", "12": MZSRE_SET, "53": "all"}


def instances(doc: dict, index: int) -> list[Instance]:
    """The requests lm-eval builds for one teacher-forced doc (``doc_to_text`` is the question itself)."""
    return [
        Instance("loglikelihood", doc, (q["prompt"], " " + q["answers"][0]), i, ("bmike53_zsre", index, 1))
        for i, q in enumerate(doc["xke"]["questions"])
    ]


def docs_for(test_langs: str, n: int, keep: set[str] | None) -> list[dict]:
    from lm_eval_xke.tasks.bmike53.utils import load_dataset

    docs = load_dataset(
        xke_bmike53_dataset="zsre",
        xke_bmike53_lang="de",
        xke_protocol="teacher_forced",
        xke_test_langs=test_langs,
        xke_data_file=data_dir(),
    )["test"]
    chosen = [doc for doc in docs if keep is None or doc["xke"]["case_id"] in keep]
    return chosen[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5, help="edit cases per configuration (default 5)")
    parser.add_argument("--editor", default="rome")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, prepared offline)")
    args = parser.parse_args()

    from lm_eval_xke import offline_models
    from lm_eval_xke.model import XKELM
    from lm_eval_xke.parallel_cases import process_results

    torch.set_num_threads(args.threads)
    model = args.model or str(offline_models.prepare("smollm2-135m-instruct"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = XKELM(pretrained=model, dtype="float32", device=device, editor=args.editor, journal="off")
    if hasattr(lm.editor, "context_templates"):
        lm.editor.context_templates(lm.backend.model, lm.backend.tokenizer, lm.hparams)

    widest = docs_for("all", args.n, None)  # records with a block in all 53 languages
    keep = {doc["xke"]["case_id"] for doc in widest}
    print(f"model {model}, editor {args.editor}, {device}, {torch.get_num_threads()} threads, {len(keep)} cases")
    print("| languages asked | questions / case | s / case | CPU s / case | editor s / case | x (2 languages) |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = None
    for name, langs in CONFIGS.items():
        docs = widest if name == "53" else docs_for(langs, args.n, keep)
        requests = [inst for i, doc in enumerate(docs) for inst in instances(doc, i)]
        before = lm.get_model_info()["xke"]["edit_seconds_total"]
        started, cpu_started = time.perf_counter(), time.process_time()
        answers = lm.loglikelihood(requests)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        edit = lm.get_model_info()["xke"]["edit_seconds_total"] - before
        by_doc: dict[int, list] = {}
        for inst, answer in zip(requests, answers, strict=True):
            by_doc.setdefault(inst.doc_id, []).append(answer)
        rel = statistics.mean(process_results(docs[i], a)["reliability_en_em"] for i, a in by_doc.items())
        base = base or seconds
        print(
            f"| {name} | {len(requests) / len(docs):.0f} | {seconds / len(docs):.2f} | {cpu / len(docs):.2f} | "
            f"{edit / len(docs):.2f} | {seconds / base:.2f} |  (reliability_en_em {rel:.2f})"
        )


if __name__ == "__main__":
    main()
