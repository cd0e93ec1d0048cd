"""Key-statistics throughput: the engine (all layers in one early-stopped pass) against a naive implementation.

The naive baseline is what the reference toolkits do: one full forward pass over the corpus per layer, each
tallying that layer's keys. Both run here, side by side, on the same documents and token budget; the script prints
tokens/s of each (tokens of corpus text per wall-clock second, all layers included), the ratio, and the largest
difference between their matrices.

    python benchmarks/stats_throughput.py --model smollm2-135m-instruct --layers 4,5,6,7,8 --corpus en --n-tokens 20000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm_eval_xke import offline_models, stats


def naive(model, tokenizer, modules: list[str], texts, n_tokens: int, batch_size: int, max_length: int):
    """One full forward pass per module over the first ``n_tokens`` tokens; the mean of k k^T per module."""
    out = {}
    captured: list[torch.Tensor] = []
    for name in modules:
        handle = model.get_submodule(name).register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
        total, count, doc = 0, 0, 0
        with torch.no_grad():
            while count < n_tokens and doc < len(texts):
                encoded = [
                    tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
                    for t in texts[doc : doc + batch_size]
                ]
                ids, mask = stats.pad_right(encoded, tokenizer.pad_token_id or 0, model.device)
                captured.clear()
                model(input_ids=ids, attention_mask=mask)
                keys = captured[0][mask.bool()].float()[: n_tokens - count]
                total, count, doc = total + keys.T @ keys, count + keys.shape[0], doc + len(encoded)
        handle.remove()
        out[name] = total / count
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="offline model name or HF folder")
    parser.add_argument("--layers", default="4,5,6,7,8")
    parser.add_argument("--module-template", default="model.layers.{}.mlp.down_proj")
    parser.add_argument("--corpus", default="en")
    parser.add_argument("--n-tokens", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    path = offline_models.prepare(args.model) if args.model in offline_models.OFFLINE_MODELS else args.model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    modules = [args.module_template.format(int(i)) for i in args.layers.split(",")]
    source = stats.parse_corpus(args.corpus)[0]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:  # a cold cache: the engine really computes
        ours = stats.key_statistics(
            model, tokenizer, modules, [source], args.n_tokens, batch_size=args.batch_size,
            max_length=args.max_length, cache_dir=cache,
        )  # fmt: skip
    engine_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = naive(model, tokenizer, modules, source.texts, args.n_tokens, args.batch_size, args.max_length)
    naive_s = time.perf_counter() - started

    diff = max((ours[n] - theirs[n]).abs().max().item() for n in modules)
    print(
        f"model {path}, modules {modules}, corpus {source.name}, {args.n_tokens} tokens, fp32, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"engine (one early-stopped pass): {engine_s:8.1f} s  {args.n_tokens / engine_s:9.0f} tokens/s")
    print(f"naive (one full pass per layer): {naive_s:8.1f} s  {args.n_tokens / naive_s:9.0f} tokens/s")
    print(f"speed-up: {naive_s / engine_s:.2f}x; largest difference between the matrices: {diff:.2e}")


if __name__ == "__main__":
    main()
