"""The math of LangEdit (Sun et al. 2025, arXiv 2506.10800): AlphaEdit's null space, moved after every edit.

The paper asks the update of step t (one language's batch) to leave what was written before alone:
``(W_(t-1) + dW_t) Kbar_(t-1) = Vbar_(t-1)``, i.e. ``dW_t Kbar_(t-1) = 0`` for the keys ``Kbar`` of the corpus and
of every earlier step, and gets it from a projection onto the null space of those keys. The authors' code builds
that null space from a second moment that is updated before every step t >= 1 with the keys edited so far,

    ``C_t = N/(N + t m) C_(t-1) + m/(N + t m) S_(t-1)``,   ``S_(t-1) = sum_(j<t) K_j^T K_j``,

(``C_0`` the corpus moment, ``N = 100000`` and ``m = 100`` in the code) and keeps the eigenvectors of ``C_t`` whose
eigenvalues are below AlphaEdit's threshold. The update itself is AlphaEdit's closed form with that projection
(``projected_update`` of ``plugins/alphaedit/compute.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_eval_xke.plugins.alphaedit.compute import null_space_projection


def blend_coefficients(n_earlier: int, corpus_count: float, edit_count: float) -> tuple[float, list[float]]:
    """``alpha_t`` and ``beta_(t,j)`` of ``C_t = alpha_t C_0 + sum_j beta_(t,j) K_j^T K_j`` after ``t = n_earlier``
    steps of the recursion ``C_t = a_t C_(t-1) + b_t S_(t-1)``, ``a_t = N/(N+t m)``, ``b_t = m/(N+t m)``.

    ``S`` is a running sum, not a mean, and every step adds all of it again, so an edit made at step j weighs
    ``sum_(s>j) b_s prod_(s<r<=t) a_r`` at step t: older edits weigh more, as in the code.
    """
    alpha, betas = 1.0, []
    for t in range(1, n_earlier + 1):
        a, b = corpus_count / (corpus_count + t * edit_count), edit_count / (corpus_count + t * edit_count)
        alpha *= a
        betas = [a * beta + b for beta in betas] + [b]  # step t-1's keys enter S_(t-1) with weight b_t
    return alpha, betas


def blended_second_moment(
    mom2: torch.Tensor, earlier_keys: Sequence[torch.Tensor], alpha: float, betas: Sequence[float]
) -> torch.Tensor:
    """``C_t = alpha_t C_0 + sum_j beta_(t,j) K_j^T K_j`` (``K_j``: ``[n_j, d_in]`` keys of step j), float64."""
    blended = alpha * mom2.double()
    for keys, beta in zip(earlier_keys, betas, strict=True):
        k = keys.double().to(blended.device)
        blended = blended + beta * (k.T @ k)
    return blended


def language_null_space(
    mom2: torch.Tensor,
    earlier_keys: Sequence[torch.Tensor],
    threshold: float,
    corpus_count: float,
    edit_count: float,
) -> torch.Tensor:
    """``P_t = U0 U0^T`` over the eigenvectors of ``C_t`` with eigenvalue < ``threshold``: the update of step t,
    ``dW = X P_t``, leaves the corpus keys and the keys of steps ``0..t-1`` (every earlier language) alone, as far as
    their weight in ``C_t`` lifts them over the threshold."""
    alpha, betas = blend_coefficients(len(earlier_keys), corpus_count, edit_count)
    return null_space_projection(blended_second_moment(mom2, earlier_keys, alpha, betas), threshold)


def edited_keys_gram(earlier_keys: Sequence[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    """``K_p^T K_p = sum_j K_j^T K_j`` over the earlier steps, float64: the code's ``cache_c`` in the solve."""
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    for keys in earlier_keys:
        k = keys.double().to(device)
        gram = gram + k.T @ k
    return gram
