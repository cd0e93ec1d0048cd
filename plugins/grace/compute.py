"""The math of GRACE (Hartvigsen et al. 2023, arXiv 2211.11031): the key of an edit and the training of its value.

The key is the wrapped module's input at the edit prompt's last token. Its value replaces the module's output
there and is trained by gradient descent on the target's negative log-likelihood, teacher-forced after the prompt.
Positions before the key never see the value, so their keys and values come from a KV cache computed once, and
each step only runs the key position and the target tokens (ROME's cached value optimisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hooks import module_io
from lm_eval_xke.editing.model_state import frozen_parameters
from lm_eval_xke.editing.rewriting import ValueBatch, reference_pass, self_checked, target_nll, value_forward
from lm_eval_xke.editing.tokens import split_prompt_target

from .codebook import Entry
from .config import GraceHyperParams


def edit_batch(tokenizer, request: EditRequest, device) -> ValueBatch:
    """The teacher-forced row ``prompt + target[:-1]``, its key position (the last prompt token) and its reads."""
    prompt_ids, target_ids = split_prompt_target(tokenizer, request.prompt, request.target_new)
    key_position = len(prompt_ids) - 1
    n = len(target_ids)
    return ValueBatch(
        rows=[prompt_ids + target_ids[:-1]],
        positions=[key_position],
        read_rows=torch.zeros(n, dtype=torch.long, device=device),
        read_cols=torch.arange(key_position, key_position + n, device=device),
        t_ids=torch.tensor(target_ids, device=device),
        t_weight=torch.full((n,), 1 / n, device=device),
    )


@torch.no_grad()
def compute_key(model, module, batch: ValueBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input (the key) and output at the last prompt token, float32, from the prompt alone."""
    position = batch.positions[0]
    input_ids = torch.tensor([batch.rows[0][: position + 1]], device=batch.t_ids.device)
    record = module_io(model, module, input_ids=input_ids)
    return record["input"][0, position].float(), record["output"][0, position].float()


def initial_value(hp: GraceHyperParams, output: torch.Tensor) -> torch.Tensor:
    """``cold``: uniform in [0, 1) from a private generator (reproducible, the global RNG untouched); ``warm``: the
    module's own output at the key."""
    if hp.val_init == "warm":
        return output.clone()
    generator = torch.Generator().manual_seed(hp.init_seed)
    return torch.rand(output.shape, generator=generator).to(output.device)


@dataclass
class TrainedValue:
    value: torch.Tensor  # float32 [d_out], detached
    nll: float  # mean target NLL with the trained value
    first_token_right: bool  # the edit prompt's next-token argmax is the target's first token


def train_value(model, module, batch: ValueBatch, entry: Entry, pad_id: int, hp: GraceHyperParams) -> TrainedValue:
    """Train ``entry``'s value with Adam (``n_iter`` steps, ``edit_lr``) so that the model states the target.

    The codebook's hook is live while training, so the forward passes see exactly what inference will see.
    ``entry.value`` is left as it was; the caller stores the trained value (so that the codebook can undo it).
    """
    reference = reference_pass(model, module, batch, pad_id)
    # the cached path must reproduce the full forward with the entry in place, else the full forward is used
    cached = value_forward(model, module, batch, pad_id, reference)
    forward, _ = self_checked(model, module, batch, pad_id, reference, cached, torch.zeros_like(entry.value))
    initial = entry.value
    value = initial.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([value], lr=hp.edit_lr)
    entry.value = value
    try:
        with frozen_parameters(model), torch.enable_grad():
            for step in range(hp.n_iter + 1):
                log_probs = forward(None)
                nll = target_nll(log_probs, batch)
                if step == hp.n_iter:  # the last pass only measures the trained value
                    break
                optimizer.zero_grad()
                nll.backward()
                optimizer.step()
    finally:
        entry.value = initial
    return TrainedValue(
        value=value.detach(),
        nll=nll.item(),
        first_token_right=bool(log_probs[0].argmax() == batch.t_ids[0]),
    )
