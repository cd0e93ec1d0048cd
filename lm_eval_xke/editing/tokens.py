"""Prompt and target tokenisation as the evaluation feeds them, fact-token positions, and right-padded batches.

Every weight editor builds its training rows from these, so an edit learns the token ids the teacher-forced
evaluation asks for and writes at the position the paper names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def split_prompt_target(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``target`` as the teacher-forced evaluation feeds them.

    This is lm-eval's ``_encode_pair`` for context ``prompt`` and continuation ``" " + target`` (the tasks'
    ``target_delimiter``): the whole text is encoded in one go and split at the prompt's own token length, so
    the joining space belongs to the target (``" Paris"``); trailing spaces of the prompt move to the target.
    Encoding the target alone would glue it to the prompt or tokenize it differently, and the edit would
    learn ids the evaluation never asks for.
    """
    context = prompt.rstrip()
    prompt_ids = tokenizer(context)["input_ids"]
    target_ids = tokenizer(prompt + " " + target)["input_ids"][len(prompt_ids) :]
    if not target_ids:
        raise ValueError(f"target {target!r} adds no tokens to prompt {prompt!r}")
    return prompt_ids, target_ids


def fact_token_index(tokenizer, template: str, prompt: str, subject: str, fact_token: str) -> int:
    """Position of the edited key in ``template.format(prompt)`` (``template`` ends with ``"{}"``).

    ``subject_last``: tokenize the text up to the end of the subject's first occurrence in ``prompt`` (not in
    the context prefix, which may mention it too); the index is that length - 1. ``last``: the prompt's last token.
    """
    if fact_token == "last":
        return len(tokenizer(template.format(prompt))["input_ids"]) - 1
    end = prompt.index(subject) + len(subject)
    return len(tokenizer(template.format(prompt[:end]))["input_ids"]) - 1


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a right-padded batch and its attention mask (positions stay 0..n-1 for every row)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)
