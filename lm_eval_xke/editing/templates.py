"""ROME's context templates: prefixes sampled from the model itself, so an edit holds beyond the bare prompt.

Shared by every editor that averages keys or losses over such prefixes (ROME, MEMIT, AlphaEdit, KN, WISE).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch

from lm_eval_xke.editing.hooks import device_of

#: First words of the sampled context prefixes, as in the original ROME code.
START_WORDS = ("The", "Therefore", "Because", "I", "You")


#: per model (weakly keyed, so a dropped model frees its entry): templates by (lengths, per_length, seed)
_TEMPLATES: WeakKeyDictionary = WeakKeyDictionary()


def context_templates(
    model,
    tokenizer,
    lengths: Sequence[int],
    per_length: int,
    seed: int,
    total_length: bool = False,
    normalise: bool = False,
) -> list[str]:
    """``generate_context_templates`` once per model and settings, then reused by every edit and every editor."""
    per_model = _TEMPLATES.setdefault(model, {})
    settings = (tuple(lengths), per_length, seed, total_length, normalise)
    if settings not in per_model:
        per_model[settings] = generate_context_templates(model, tokenizer, *settings)
    return per_model[settings]


def generate_context_templates(
    model,
    tokenizer,
    lengths: Sequence[int],
    per_length: int,
    seed: int,
    total_length: bool = False,
    normalise: bool = False,
) -> list[str]:
    """``["{}"]`` plus ``"<prefix>. {}"`` for prefixes sampled from the model itself (top-k 5).

    Averaging keys and losses over such prefixes makes the edit hold in contexts other than the bare prompt.
    A prefix is its start word and ``length`` sampled tokens, or with ``total_length`` ``length`` tokens in all
    (start word and BOS included, as EasyEdit's ``generate_fast``); ``normalise`` applies ``generate_fast``'s NFKD
    and blank-line clean-up. Sampling uses a private generator seeded with ``seed``, so the templates are
    reproducible and the global RNG state of the caller is left untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    templates = ["{}"]
    for length in lengths:
        counts = [per_length // len(START_WORDS) + (i < per_length % len(START_WORDS)) for i in range(len(START_WORDS))]
        for word, count in zip(START_WORDS, counts, strict=True):
            new_tokens = max(0, length - len(tokenizer(word)["input_ids"])) if total_length else length
            if count:
                for text in sample_continuations(model, tokenizer, word, count, new_tokens, generator):
                    if normalise:
                        text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
                    # braces would break str.format; otherwise the text is kept as the model wrote it
                    templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


@torch.no_grad()
def sample_continuations(
    model, tokenizer, start: str, count: int, length: int, generator: torch.Generator, top_k: int = 5
) -> list[str]:
    """``count`` texts of ``start`` followed by ``length`` top-k sampled tokens (one unpadded batch, KV cache)."""
    ids = torch.tensor([tokenizer(start)["input_ids"]] * count, device=device_of(model))
    sequence, past = ids, None
    for _ in range(length):
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        top = out.logits[:, -1].float().topk(top_k, dim=-1)
        # sample on CPU so the templates do not depend on the accelerator's RNG
        choice = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=generator)
        ids = top.indices.gather(-1, choice.to(top.indices.device))
        sequence = torch.cat([sequence, ids], dim=1)
    return tokenizer.batch_decode(sequence, skip_special_tokens=True)
