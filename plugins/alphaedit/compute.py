"""The math of AlphaEdit (Fang et al. 2025, arXiv 2410.02355): MEMIT's update projected onto a null space.

The preserved knowledge K0 (the corpus keys, second moment C) should map to unchanged values: ``dW K0^T = 0``. With
``P`` the projection onto the span of C's eigenvectors whose eigenvalues are below a threshold (the null space of
K0, numerically), any ``dW = X P`` leaves the preserved keys alone. AlphaEdit solves for it in closed form (eq. 13):
``dW = R^T K P (P (K^T K + K_p^T K_p) + alpha I)^-1``, where K are the new keys and K_p the keys of earlier edits
of a sequential run, which the update must also not disturb.
"""

from __future__ import annotations

import torch


def null_space_projection(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = U0 U0^T`` over the eigenvectors of C with eigenvalue < ``threshold``, float64."""
    eigenvalues, eigenvectors = torch.linalg.eigh(mom2.double())
    null = eigenvectors[:, eigenvalues < threshold]
    return null @ null.T


def projected_update(keys: torch.Tensor, projection: torch.Tensor, preserved: torch.Tensor, alpha: float):
    """``A`` of ``dW = R^T A``: ``A = (P K^T)^T (P (K^T K + K_p^T K_p) + alpha I)^-T``, ``[n, d_in]`` float32.

    The solve is done as in the paper's code: ``X = (P (K^T K + K_p^T K_p) + alpha I)^-1 P K^T`` and ``A = X^T``.
    """
    k = keys.double().to(projection.device)
    eye = torch.eye(projection.shape[0], dtype=torch.float64, device=projection.device)
    system = projection @ (k.T @ k + preserved.to(projection.device)) + alpha * eye
    return torch.linalg.solve(system, projection @ k.T).T.float()
