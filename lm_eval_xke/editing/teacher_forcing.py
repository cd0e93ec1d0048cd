"""Teacher-forced edit batches: ``prompt + target[:-1]`` per request and the log-prob of every target token.

The loss of the gradient editors (FT-L/M, LoRA, MEND) and the evaluation's exact match read the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hidden_states import padding_id
from lm_eval_xke.editing.tokens import pad_right, split_prompt_target

#: where the target tokens are scored: all at the prompt's last position (FT-L), or teacher-forced (FT-M)
OBJECTIVES = ("prompt_last", "target_new")


@dataclass
class EditBatch:
    """``prompt + target[:-1]`` per request, right-padded, and where each target token is read.

    Row r's target token j is predicted at ``read_cols[r, j] = prompt_len - 1 + j`` (teacher forcing); the
    prompt's last position is ``read_cols[r, 0]``. ``target_mask`` marks real (unpadded) target tokens.
    """

    input_ids: torch.Tensor  # [n, width]
    attention_mask: torch.Tensor  # [n, width]
    target_ids: torch.Tensor  # [n, max_target]
    target_mask: torch.Tensor  # [n, max_target], bool
    read_cols: torch.Tensor  # [n, max_target]


def build_edit_batch(tokenizer, requests: Sequence[EditRequest], device) -> EditBatch:
    """Tokenize every request as the teacher-forced evaluation does (``split_prompt_target``) and batch them."""
    pairs = [split_prompt_target(tokenizer, r.prompt, r.target_new) for r in requests]
    input_ids, attention_mask = pad_right([p + t[:-1] for p, t in pairs], padding_id(tokenizer), device)
    longest = max(len(t) for _, t in pairs)
    target_ids = torch.zeros((len(pairs), longest), dtype=torch.long)
    target_mask = torch.zeros((len(pairs), longest), dtype=torch.bool)
    read_cols = torch.zeros((len(pairs), longest), dtype=torch.long)
    for row, (prompt, target) in enumerate(pairs):
        target_ids[row, : len(target)] = torch.tensor(target)
        target_mask[row, : len(target)] = True
        # padded slots read the last real position, so every index stays inside the row
        read_cols[row] = len(prompt) - 1 + torch.arange(longest).clamp_max(len(target) - 1)
    return EditBatch(input_ids, attention_mask, target_ids.to(device), target_mask.to(device), read_cols.to(device))


def target_log_probs(model, batch: EditBatch, objective: str) -> torch.Tensor:
    """``log p`` of every target token, ``[n, max_target]`` (float32; padded slots are garbage, mask them)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    cols = batch.read_cols if objective == "target_new" else batch.read_cols[:, :1].expand_as(batch.read_cols)
    keep, column = torch.unique(cols, sorted=True, return_inverse=True)  # project only the read positions
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    rows = torch.arange(len(cols), device=cols.device)[:, None]
    log_probs = logits[rows, column].float().log_softmax(-1)
    return log_probs.gather(-1, batch.target_ids[..., None]).squeeze(-1)
