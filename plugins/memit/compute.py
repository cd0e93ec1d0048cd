"""The math of MEMIT (Meng et al. 2023, arXiv 2210.07229), one small function per step of the paper.

MEMIT writes many facts at once by spreading each fact's required change of the residual stream over several MLP
output projections. For every request, ``compute_z`` finds the residual change ``delta`` at the last edited layer L
that makes the model state the target (ROME's ``compute_v`` at layer L). Then, layer by layer from the first, the
remaining residual error ``R = z - h_L`` is divided among the layers still to edit and written into
``W_l`` with the least-squares update ``dW_l = R^T (lambda C_l + K_l^T K_l)^-1 K_l`` (eq. 14 of the paper; rows of
``K_l`` are the requests' keys at layer l, ``C_l`` the second moment of that layer's keys over a corpus).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hidden_states import padding_id
from lm_eval_xke.editing.hooks import device_of, module_io
from lm_eval_xke.editing.tokens import fact_token_index, pad_right
from lm_eval_xke.editors import WeightDelta


@torch.no_grad()
def compute_ks(
    model,
    tokenizer,
    module,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    groups: Sequence[int],
    fact_token: str,
) -> torch.Tensor:
    """``K``: per request, the module's input at the fact token, ``[n, d_in]``: the mean over the template groups
    (``groups``: their sizes, in order) of each group's mean, as the MEMIT code averages them.

    The bare prompt is a group of its own, so with MEMIT's templates (the bare prompt and 5 prefixes of 10 tokens)
    it weighs 1/2, not 1/6: the key stays close to the bare prompt's, which is the one the edit is asked on.
    """
    if sum(groups) != len(templates):
        raise ValueError(f"template groups {list(groups)} do not add up to the {len(templates)} templates")
    texts, positions = [], []
    for request in requests:
        for template in templates:
            texts.append(template.format(request.prompt))
            positions.append(fact_token_index(tokenizer, template, request.prompt, request.subject, fact_token))
    input_ids, mask = pad_right([tokenizer(t)["input_ids"] for t in texts], padding_id(tokenizer), device_of(model))
    inputs = module_io(model, module, input_ids=input_ids, attention_mask=mask)["input"]
    rows = torch.arange(len(texts), device=inputs.device)
    keys = inputs[rows, torch.tensor(positions, device=inputs.device)].float()
    group_means = [part.mean(1) for part in keys.view(len(requests), len(templates), -1).split(list(groups), dim=1)]
    return torch.stack(group_means, dim=1).mean(1)


@torch.no_grad()
def residual_at_fact(model, tokenizer, block, requests: Sequence[EditRequest], fact_token: str) -> torch.Tensor:
    """``h_L``: the block's output (the residual stream) at each bare prompt's fact token, ``[n, d_model]``."""
    positions = [fact_token_index(tokenizer, "{}", r.prompt, r.subject, fact_token) for r in requests]
    encoded = [tokenizer(r.prompt)["input_ids"] for r in requests]
    input_ids, mask = pad_right(encoded, padding_id(tokenizer), device_of(model))
    output = module_io(model, block, input_ids=input_ids, attention_mask=mask)["output"]
    hidden = output[0] if isinstance(output, tuple) else output
    rows = torch.arange(len(requests), device=hidden.device)
    return hidden[rows, torch.tensor(positions, device=hidden.device)].float()


def spread_residual(targets: torch.Tensor, layers_left: int) -> torch.Tensor:
    """The share of the remaining residual error this layer writes: ``R / (number of layers still to edit)``."""
    return targets / layers_left


def least_squares_update(keys: torch.Tensor, mom2: torch.Tensor, lam: float) -> torch.Tensor:
    """``A`` such that ``dW = R^T A``: ``A = (lambda C + K^T K)^-1 K^T`` transposed, ``[n, d_in]`` (float64 solve).

    Minimises ``||dW K^T - R^T||^2 + lambda tr(dW C dW^T)``: the new keys map to their targets while the values of
    typical keys (second moment C) move as little as possible.
    """
    k, c = keys.double(), mom2.to(keys.device).double()
    return torch.linalg.solve(lam * c + k.T @ k, k.T).T.float()


def layer_delta(parameter: str, module, residual: torch.Tensor, key_side: torch.Tensor) -> WeightDelta:
    """``dW = R^T A`` (rank <= n) as ``b @ a`` in the weight layout: ``nn.Linear [out, in]``, ``Conv1D [in, out]``."""
    if isinstance(module, torch.nn.Linear):
        return WeightDelta(parameter=parameter, b=residual.T.contiguous(), a=key_side.contiguous())
    if type(module).__name__ == "Conv1D":
        return WeightDelta(parameter=parameter, b=key_side.T.contiguous(), a=residual.contiguous())
    raise TypeError(f"MEMIT edits nn.Linear or Conv1D modules, not {type(module).__name__}")
