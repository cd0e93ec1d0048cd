"""Hugging Face transformers backend: lm-eval's HFLM for loading and generation, plus the teacher-forced read-out.

The model is edited in place (`backend.model` is the live `nn.Module`), so answering needs no
knowledge of the editor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from lm_eval.models.huggingface import HFLM

from lm_eval_xke.editing.hidden_states import project_reads
from lm_eval_xke.responses import readout_response

# Sequences per forward pass of the read-out; bounds memory when many cases are read out together.
READOUT_CHUNK = 64


@dataclass(frozen=True)
class Readout:
    """Teacher-forced argmax read-out of one (context, continuation) pair.

    ``answer`` decodes the argmax token at every target position (so it has as many tokens as the
    target); ``answer_ids``/``target_ids`` re-tokenize the decoded strings without special tokens,
    which is what the Bi-ZsRE reference scorer computes its token-overlap F1 on.
    """

    loglikelihood: float
    is_greedy: bool
    answer: str
    target: str
    answer_ids: list[int]
    target_ids: list[int]

    def as_response(self) -> tuple[float, bool, str]:
        """lm-eval's loglikelihood pair, plus the read-out (``lm_eval_xke.responses``)."""
        details = {
            "answer": self.answer,
            "target": self.target,
            "answer_ids": self.answer_ids,
            "target_ids": self.target_ids,
        }
        return readout_response(self.loglikelihood, self.is_greedy, details)


class HFBackend:
    """Wraps an `HFLM` built from the usual model_args (pretrained, dtype, device, batch_size, ...)."""

    name = "hf"

    def __init__(self, **hflm_kwargs) -> None:
        self.lm = HFLM(**hflm_kwargs)

    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    # ------------------------------------------------------------ answering

    def readout(self, pairs: Sequence[tuple[str, str]]) -> list[Readout]:
        """Teacher-forced read-out of each (context, continuation), in batched forward passes."""
        results: list[Readout] = []
        for start in range(0, len(pairs), READOUT_CHUNK):
            results.extend(self._readout_batch(pairs[start : start + READOUT_CHUNK]))
        return results

    @torch.no_grad()
    def _readout_batch(self, pairs: Sequence[tuple[str, str]]) -> list[Readout]:
        encoded = [self.lm._encode_pair(ctx, cont) for ctx, cont in pairs]
        max_len = self.lm.max_length
        # the model sees context + continuation minus its last token; keep the right end if too long
        inputs = [(ctx + cont)[:-1][-max_len:] for ctx, cont in encoded]
        width = max(len(x) for x in inputs)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, seq in enumerate(inputs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        # only the continuation's positions are projected onto the vocabulary
        spans = [range(len(seq) - len(cont), len(seq)) for (_, cont), seq in zip(encoded, inputs, strict=True)]
        device = self.lm.device
        rows = torch.tensor([row for row, span in enumerate(spans) for _ in span], device=device)
        cols = torch.tensor([col for span in spans for col in span], device=device)
        with project_reads(self.model, rows, cols):
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = logits[0].float().log_softmax(-1).cpu().split([len(span) for span in spans])

        out = []
        for (_, cont), row_logprobs in zip(encoded, logprobs, strict=True):
            target = torch.tensor(cont)
            argmax = row_logprobs.argmax(dim=-1)
            answer = self.tokenizer.decode(argmax.tolist(), skip_special_tokens=True)
            gold = self.tokenizer.decode(cont, skip_special_tokens=True)
            out.append(
                Readout(
                    loglikelihood=float(row_logprobs.gather(1, target[:, None]).sum()),
                    is_greedy=bool((argmax == target).all()),
                    answer=answer,
                    target=gold,
                    answer_ids=self._text_ids(answer),
                    target_ids=self._text_ids(gold),
                )
            )
        return out

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, instances: Sequence) -> list[str]:
        """Greedy generation through HFLM, all given requests in one batch."""
        with self._batch_size_at_least(len(instances)):
            return self.lm.generate_until(list(instances), disable_tqdm=True)

    @contextlib.contextmanager
    def _batch_size_at_least(self, n: int) -> Iterator[None]:
        # HFLM batches by its batch_size (the CLI always sends 1); one edit case's questions go in one batch
        saved = self.lm.batch_size_per_gpu
        if isinstance(saved, int):
            self.lm.batch_size_per_gpu = max(saved, n)
        try:
            yield
        finally:
            self.lm.batch_size_per_gpu = saved
