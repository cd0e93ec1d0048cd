"""The math of ROME (Meng et al. 2022, arXiv 2202.05262), one small function per step of the paper.

ROME treats an MLP output projection ``W`` as a key-value memory: the key ``k`` is the module's input at the
subject's last token and ``W k`` its value. An edit finds a value ``v*`` that makes the model state the new
target (``compute_v``) and writes it with the rank-one update ``dW = right ⊗ u`` so that ``W' k = v*``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hidden_states import padding_id
from lm_eval_xke.editing.hooks import device_of, module_io
from lm_eval_xke.editing.tokens import fact_token_index, pad_right
from lm_eval_xke.editors import WeightDelta

from .compute_v import ValueSolution

# ---------------------------------------------------------------- keys: k and u


@torch.no_grad()
def compute_k(
    model, tokenizer, module, request: EditRequest, templates: Sequence[str], fact_token: str
) -> torch.Tensor:
    """The key ``k``: the module's input at the fact token, averaged over the context templates (float32)."""
    texts = [t.format(request.prompt) for t in templates]
    positions = [fact_token_index(tokenizer, t, request.prompt, request.subject, fact_token) for t in templates]
    input_ids, mask = pad_right([tokenizer(x)["input_ids"] for x in texts], padding_id(tokenizer), device_of(model))
    inputs = module_io(model, module, input_ids=input_ids, attention_mask=mask)["input"]
    keys = inputs[torch.arange(len(texts), device=inputs.device), torch.tensor(positions, device=inputs.device)]
    return keys.float().mean(0)


def compute_u(k: torch.Tensor, inv_mom2: torch.Tensor | None = None) -> torch.Tensor:
    """The left vector ``u = C^-1 k / ||C^-1 k||`` (``u = k / ||k||`` without the covariance adjustment).

    With C, the update ``right ⊗ u`` moves the value of ``k`` while disturbing the values of typical keys
    the least (the paper's constrained least squares); without it, it simply points along ``k``.
    """
    u = k.float() if inv_mom2 is None else inv_mom2.to(k.device, torch.float32) @ k.float()
    return u / u.norm()


def inverse_second_moment(mom2: torch.Tensor) -> torch.Tensor:
    """``C^-1`` in float64 for accuracy, with a relative ridge of 1e-6 that only matters for rank-deficient C."""
    c = mom2.double()
    ridge = 1e-6 * c.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.inv(c + ridge * torch.eye(c.shape[0], dtype=c.dtype)).float()


# ---------------------------------------------------------------- the rank-one update


def compute_right(u: torch.Tensor, solution: ValueSolution) -> torch.Tensor:
    """``right = (v* - W k) / (k · u)`` at the plain prompt, so that ``(W + right ⊗ u) k = v*``."""
    return (solution.v_star - solution.out_plain) / torch.dot(solution.k_plain, u)


def rank_one_delta(parameter: str, module, u: torch.Tensor, right: torch.Tensor) -> WeightDelta:
    """``dW = right ⊗ u`` as ``b @ a`` in the weight's own layout.

    ``nn.Linear`` stores ``[out, in]``: ``b = right`` (column), ``a = u`` (row). GPT-2's ``Conv1D`` stores
    ``[in, out]`` and computes ``x @ W``: the same change is ``b = u``, ``a = right``.
    """
    right, u = right.float(), u.float()
    if isinstance(module, torch.nn.Linear):
        return WeightDelta(parameter=parameter, b=right[:, None], a=u[None, :])
    if type(module).__name__ == "Conv1D":
        return WeightDelta(parameter=parameter, b=u[:, None], a=right[None, :])
    raise TypeError(f"ROME edits nn.Linear or Conv1D modules, not {type(module).__name__}")
