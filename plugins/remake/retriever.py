"""ReMaKE's retriever: embed the edits in memory and the question, take the nearest edit, keep it when the cosine
similarity reaches the scope threshold (an unrelated question gets no edit, which is what keeps locality).

The paper scores (edit, question) pairs with a fine-tuned XLM-R classifier and retrieves with
``paraphrase-multilingual-mpnet-base-v2``; neither installs from a package registry. The default encoder is the
evaluated model itself (PromptEOL: the last token's hidden state of a one-word summary prompt), and a
sentence-transformers model can be named.
The threshold is calibrated on the translated training pools: questions against their own translations and
paraphrases (in scope) and against other records' questions (out of scope), at the best balanced accuracy.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from lm_eval_xke.editing.hidden_states import padding_id
from lm_eval_xke.editing.tokens import pad_right
from lm_eval_xke.editors import EditorError
from lm_eval_xke.plugins.ike.pool import DemoPool

ST_PREFIX = "sentence-transformers:"
ENCODE_BATCH = 16


class Encoder(Protocol):
    """Texts to unit vectors, ``[n, d]`` float32 on the CPU; ``description`` says which model and how."""

    description: str

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


class PromptEolEncoder:
    """The evaluated model's own sentence embedding, PromptEOL (Jiang et al. 2023, arXiv 2307.16645): the text is
    put in ``This sentence : "{text}" means in one word:"`` and the hidden state of the last token is the embedding
    (the model's final, normalised one by default). On MzsRE's pools with Qwen2.5-0.5B it separates translations
    from unrelated questions far better than mean-pooled block outputs (README, *Retriever*)."""

    template = 'This sentence : "{text}" means in one word:"'

    def __init__(self, model, tokenizer, embed_layer: int | None) -> None:
        n = model.config.num_hidden_layers
        self._model, self._tokenizer = model, tokenizer
        # hidden_states[0] is the embedding output, [i + 1] block i's output (the last one after the final norm)
        self._index = n if embed_layer is None else embed_layer % n + 1
        where = "the final normalised hidden state" if self._index == n else f"the output of block {self._index - 1}"
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.description = f"{name}: PromptEOL, last token's {where} (of {n} blocks), cosine"

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(
            torch.cat([self._last_token(texts[i : i + ENCODE_BATCH]) for i in range(0, len(texts), ENCODE_BATCH)]),
            dim=-1,
        )

    def _last_token(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self._model.parameters()).device
        ids = [self._tokenizer(self.template.format(text=t))["input_ids"] for t in texts]
        input_ids, mask = pad_right(ids, padding_id(self._tokenizer), device)
        hidden = self._model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        last = torch.tensor([len(i) - 1 for i in ids], device=device)
        return hidden[self._index][torch.arange(len(ids), device=device), last].float().cpu()


class SentenceEncoder:
    """A sentence-transformers model, by name (from its cache when offline) or local folder."""

    def __init__(self, name: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EditorError(
                f"retriever={ST_PREFIX}{name} needs the sentence-transformers package: pip install "
                "sentence-transformers (or retriever=model, the evaluated model's own hidden states)"
            ) from None
        try:
            self._model = SentenceTransformer(name, device="cpu")
        except Exception as err:  # noqa: BLE001 - any load failure is the user's model name or a missing download
            raise EditorError(
                f"retriever={ST_PREFIX}{name}: the model cannot be loaded ({type(err).__name__}: {err}). Offline, give "
                "a local folder, or retriever=model"
            ) from None
        self.description = f"sentence-transformers {name}, cosine"

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        vectors = self._model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True)
        return vectors.float().cpu()


def make_encoder(retriever: str, model, tokenizer, embed_layer: int | None) -> Encoder:
    if retriever == "model":
        return PromptEolEncoder(model, tokenizer, embed_layer)
    if retriever.startswith(ST_PREFIX) and retriever[len(ST_PREFIX) :]:
        return SentenceEncoder(retriever[len(ST_PREFIX) :])
    raise EditorError(f"retriever must be 'model' or '{ST_PREFIX}NAME', got {retriever!r}")


# ---------------------------------------------------------------- scope threshold


@dataclass(frozen=True)
class Calibration:
    """The scope threshold and how well it separated the calibration pairs."""

    threshold: float
    in_scope_found: float  # share of translation / paraphrase pairs at or above the threshold
    out_of_scope_rejected: float  # share of unrelated pairs below it
    pairs: int

    def as_dict(self) -> dict:
        return {
            "threshold": round(self.threshold, 6),
            "in_scope_found": round(self.in_scope_found, 4),
            "out_of_scope_rejected": round(self.out_of_scope_rejected, 4),
            "pairs_per_class": self.pairs,
        }


def calibration_texts(pool: DemoPool, key_lang: str, n: int, seed: int) -> list[tuple[str, list[str]]]:
    """``n`` seeded pool records with a ``key_lang`` question: (that question, its translations and paraphrase)."""
    usable = [f for f in pool.facts if key_lang in f.questions and (len(f.questions) > 1 or key_lang in f.paraphrases)]
    if len(usable) < 2:
        raise EditorError(
            f"ReMaKE cannot calibrate its scope threshold: the pool has fewer than 2 {key_lang} questions with a "
            "translation or paraphrase; give scope_threshold=<cosine>"
        )
    chosen = random.Random(seed).sample(usable, min(n, len(usable)))
    return [
        (
            f.questions[key_lang],
            [q for lang, q in sorted(f.questions.items()) if lang != key_lang]
            + ([f.paraphrases[key_lang]] if key_lang in f.paraphrases else []),
        )
        for f in chosen
    ]


def calibrate(encoder: Encoder, records: Sequence[tuple[str, list[str]]]) -> Calibration:
    """The threshold with the best balanced accuracy: record i's key against its own restatements (in scope) and
    against record i+1's (out of scope, the same number of pairs)."""
    keys = encoder.encode([key for key, _ in records])
    restated = [encoder.encode(texts) for _, texts in records]
    positive = torch.cat([r @ keys[i] for i, r in enumerate(restated)]).numpy()
    negative = torch.cat([restated[(i + 1) % len(records)] @ keys[i] for i in range(len(records))]).numpy()
    threshold, found, rejected = best_threshold(positive, negative)
    return Calibration(threshold, found, rejected, min(len(positive), len(negative)))


def best_threshold(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float, float]:
    """(threshold, found, rejected) maximising (share of positives >= t + share of negatives < t) / 2; the
    threshold is halfway between the two scores it separates, and the lowest of equally good ones."""
    scores = np.unique(np.concatenate([positive, negative]))
    candidates = np.concatenate([[scores[0]], (scores[1:] + scores[:-1]) / 2, [np.nextafter(scores[-1], np.inf)]])
    found = (positive[None, :] >= candidates[:, None]).mean(1)
    rejected = (negative[None, :] < candidates[:, None]).mean(1)
    best = int(np.argmax(found + rejected))
    return float(candidates[best]), float(found[best]), float(rejected[best])
