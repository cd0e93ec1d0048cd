"""Causal tracing (Meng et al. 2022, §2): at which depth the MLPs carry what a model recalls about a subject.

For each prompt the subject's token embeddings are corrupted with Gaussian noise (``noise`` x the standard deviation
of the subject embeddings), which lowers the probability of the model's own clean next-token prediction. Then, per
block ``l``, the MLP outputs of a window of blocks around ``l`` are restored to their clean values at the subject's
last token; the probability recovered is ``l``'s indirect effect. Averaged over prompts (the AIE) it peaks where
the fact is recalled, which is where MEMIT writes: the paper reads GPT-J's layers 3-8 off this trace. The window is
the paper's 10 of GPT-2 XL's 48 blocks, at the same relative depth of the traced model.

``lm-eval-xke trace --pretrained M`` prints the trace of Bi-ZsRE prompts and the ``layers=`` it suggests;
``layers=auto`` (MEMIT, AlphaEdit, LangEdit) edits those layers: :func:`traced_layers`, cached per model.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lm_eval_xke.editing.hidden_states import decoder_blocks
from lm_eval_xke.editors import AtDepth, EditorError

#: the paper's MLP restoration window: 10 of GPT-2 XL's 48 blocks
WINDOW = AtDepth(10, of=48)


@dataclass(frozen=True)
class Trace:
    """The average indirect effect of each block's MLP at the subject's last token, and what it is measured against."""

    effects: list[float]  # per block: mean p(prediction | corrupted, window restored) - p(prediction | corrupted)
    clean: float  # mean p(prediction) of the clean prompts
    corrupted: float  # mean p(prediction) with the subject corrupted
    window: int
    prompts: int
    noise_std: float

    def best_window(self, size: int) -> list[int]:
        """The ``size`` consecutive blocks with the largest summed effect (MEMIT's critical layers)."""
        size = max(1, min(size, len(self.effects)))
        sums = [sum(self.effects[i : i + size]) for i in range(len(self.effects) - size + 1)]
        start = max(range(len(sums)), key=sums.__getitem__)
        return list(range(start, start + size))


def subject_span(tokenizer, prompt: str, subject: str) -> tuple[list[int], int, int]:
    """The prompt's token ids and the span ``[first, last]`` of the tokens that overlap the subject's characters."""
    begin = prompt.index(subject)
    end = begin + len(subject)
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > begin]
    return encoded["input_ids"], inside[0], inside[-1]


@contextlib.contextmanager
def _hooks(pairs: Sequence[tuple[nn.Module, object]]) -> Iterator[None]:
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _noised(span: tuple[int, int], noise: torch.Tensor):
    """A forward hook adding ``noise`` (``[samples, span, d]``) to the embeddings of the span's tokens."""

    def hook(_module, _args, output):
        output = output.clone()
        output[:, span[0] : span[1] + 1] += noise.to(output.dtype)
        return output

    return hook


def _restored(position: int, clean: torch.Tensor):
    """A forward hook putting the clean MLP output (``[d]``) back at ``position`` in every row."""

    def hook(_module, _args, output):
        output = output.clone()
        output[:, position] = clean.to(output.dtype)
        return output

    return hook


@torch.no_grad()
def trace_prompt(
    model, mlps: Sequence[nn.Module], ids: list[int], span: tuple[int, int], noise: torch.Tensor, window: int
) -> tuple[float, float, list[float]]:
    """``(p clean, p corrupted, effect per block)`` of one prompt; ``noise`` holds one corruption per sample."""
    device = next(model.parameters()).device
    embed, noise, last = model.get_input_embeddings(), noise.to(device), span[1]
    clean_outputs: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(_module, _args, output):
            clean_outputs[layer] = output[0, last].detach().clone()

        return hook

    tokens = torch.tensor([ids], device=device)
    with _hooks([(mlp, keep(i)) for i, mlp in enumerate(mlps)]):
        probs = model(input_ids=tokens, logits_to_keep=1).logits[0, -1].float().softmax(-1)
    prediction = int(probs.argmax())
    batch = tokens.expand(noise.shape[0], -1)

    def corrupted_probability(restore: Sequence[int]) -> float:
        restored = [(mlps[i], _restored(last, clean_outputs[i])) for i in restore]
        with _hooks([(embed, _noised(span, noise)), *restored]):
            logits = model(input_ids=batch, logits_to_keep=1).logits[:, -1]
            return logits.float().softmax(-1)[:, prediction].mean().item()

    corrupted = corrupted_probability(())
    effects = []
    for layer in range(len(mlps)):
        # the window is centred on the block and cut at the model's ends, as the paper's code does
        window_blocks = range(max(0, layer - window // 2), min(len(mlps), layer - window // 2 + window))
        effects.append(corrupted_probability(window_blocks) - corrupted)
    return float(probs[prediction]), corrupted, effects


@torch.no_grad()
def subject_embedding_std(model, spans: Sequence[tuple[list[int], int, int]]) -> float:
    """The standard deviation of the subjects' token embeddings (as the model's embedding layer outputs them)."""
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    values = [embed(torch.tensor(ids[a : b + 1], device=device)).float().flatten() for ids, a, b in spans]
    return torch.cat(values).std().item()


def causal_trace(
    model,
    tokenizer,
    prompts: Sequence[tuple[str, str]],
    samples: int = 10,
    noise: float = 3.0,
    window: int | None = None,
    seed: int = 0,
) -> Trace:
    """The trace of ``(prompt, subject)`` pairs: ``samples`` corruptions per prompt (a private generator, ``seed``)."""
    spans = [subject_span(tokenizer, prompt, subject) for prompt, subject in prompts]
    n_blocks = model.config.num_hidden_layers
    window = max(1, min(n_blocks, window or WINDOW.resolve(n_blocks)))
    std = noise * subject_embedding_std(model, spans)
    generator = torch.Generator().manual_seed(seed)
    hidden = model.get_input_embeddings().weight.shape[1]
    mlps = [block.mlp for block in decoder_blocks(model)]
    clean, corrupted, effects = [], [], []
    for ids, first, last in spans:
        draw = torch.randn((samples, last - first + 1, hidden), generator=generator) * std
        p_clean, p_corrupted, per_block = trace_prompt(model, mlps, ids, (first, last), draw, window)
        clean.append(p_clean)
        corrupted.append(p_corrupted)
        effects.append(per_block)
    mean = torch.tensor(effects).mean(0).tolist()
    return Trace(mean, sum(clean) / len(clean), sum(corrupted) / len(corrupted), window, len(spans), std)


def bizsre_prompts(data_file: str | None, lang: str, limit: int) -> tuple[list[tuple[str, str]], str]:
    """The first ``limit`` Bi-ZsRE test prompts in ``lang`` whose subject is in the prompt, and the data's sha256."""
    from lm_eval_xke.data import load_bizsre

    data = load_bizsre(data_file, skip_invalid=True)
    blocks = [record[lang] for _, record in data.records]
    return [(b["src"], b["subject"]) for b in blocks if b["subject"] in b["src"]][:limit], data.sha256


#: what ``layers=auto`` traces: the ``trace`` command's defaults
AUTO_SETTINGS = {"lang": "en", "limit": 20, "samples": 10, "noise": 3.0}


def traced_layers(model, tokenizer, size: int, data_file: str | None = None) -> dict:
    """``layers=auto``: the ``size`` consecutive blocks with the largest summed indirect effect on Bi-ZsRE's first
    English prompts (``AUTO_SETTINGS``), with the trace they were read from; cached under the cache folder per
    model weights, data and settings, so a model is traced once."""
    from lm_eval_xke.data import cache_dir, write_atomic
    from lm_eval_xke.journal import digest
    from lm_eval_xke.stats import weights_fingerprint

    try:
        prompts, sha256 = bizsre_prompts(data_file, AUTO_SETTINGS["lang"], AUTO_SETTINGS["limit"])
    except (FileNotFoundError, ValueError) as err:
        raise EditorError(
            f"layers=auto traces Bi-ZsRE prompts, which could not be read ({err}); set XKE_DATA_DIR or "
            "xke_data_file=<bizsre_test.json>, or give the layers (lm-eval-xke trace suggests them)"
        ) from None
    key = digest([weights_fingerprint(model), sha256, AUTO_SETTINGS, size])
    path = cache_dir() / "traces" / f"{key[:32]}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    started = time.perf_counter()
    settings = {k: AUTO_SETTINGS[k] for k in ("samples", "noise")}
    trace = causal_trace(model, tokenizer, prompts, **settings)
    record = {
        "layers": trace.best_window(size),
        "rule": f"the {size} consecutive blocks with the largest summed average indirect effect of their MLPs",
        "prompts": f"{trace.prompts} Bi-ZsRE {AUTO_SETTINGS['lang']} test prompts (sha256 {sha256[:12]})",
        **settings,
        "window": trace.window,
        "effects": trace.effects,
        "p_clean": round(trace.clean, 5),
        "p_corrupted": round(trace.corrupted, 5),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(record), encoding="utf-8"))
    return record


# ---------------------------------------------------------------- lm-eval-xke trace


def add_subcommand(sub) -> None:
    p = sub.add_parser("trace", help="causal trace of a model's MLPs on Bi-ZsRE prompts: where MEMIT should write")
    p.add_argument("--pretrained", required=True, help="HF model folder or name, or an offline model name")
    p.add_argument(
        "--lang", default=AUTO_SETTINGS["lang"], choices=("en", "zh"), help="Bi-ZsRE language of the prompts"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=AUTO_SETTINGS["limit"],
        help="number of Bi-ZsRE test records traced (the first ones)",
    )
    p.add_argument("--samples", type=int, default=AUTO_SETTINGS["samples"], help="noise samples per prompt")
    p.add_argument(
        "--noise",
        type=float,
        default=AUTO_SETTINGS["noise"],
        help="noise std as a multiple of the subject embeddings' std",
    )
    p.add_argument("--window", type=int, default=None, help="blocks restored together (default: 10 of 48, scaled)")
    p.add_argument("--size", type=int, default=5, help="number of consecutive blocks suggested for MEMIT's layers")
    p.add_argument("--data-file", default=None, help="bizsre_test.json (default: found through XKE_DATA_DIR)")
    p.add_argument("--model-dtype", default="float32", help="dtype the model is loaded in")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_trace_command)


def _trace_command(args) -> int:
    from lm_eval_xke.offline_models import load_pretrained

    model, tokenizer, path = load_pretrained(args.pretrained, args.model_dtype, args.device)
    prompts, sha256 = bizsre_prompts(args.data_file, args.lang, args.limit)
    started = time.perf_counter()
    trace = causal_trace(model, tokenizer, prompts, args.samples, args.noise, args.window)
    print(
        f"causal trace of {path}: {trace.prompts} Bi-ZsRE {args.lang} prompts (sha256 {sha256[:12]}, records "
        f"whose subject is in the prompt), {args.samples} corruptions each, noise std {trace.noise_std:.4g} "
        f"({args.noise} x the subject embeddings'), MLP outputs restored at the subject's last token over "
        f"{trace.window} blocks; p(model's own prediction): clean {trace.clean:.3f}, corrupted {trace.corrupted:.3f} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    top = max(max(trace.effects), 1e-12)
    print("block  indirect effect")
    for layer, effect in enumerate(trace.effects):
        print(f"{layer:5d}  {effect:+.4f}  {'#' * max(0, round(40 * effect / top))}")
    layers = trace.best_window(args.size)
    print(f"largest summed effect over {len(layers)} blocks: layers={'|'.join(map(str, layers))}")
    return 0
