"""AlphaEdit hyper-parameters: MEMIT's, plus the null-space threshold and the update's ridge."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.plugins.memit.config import SPREAD_DEFAULTS as FAMILY_DEFAULTS
from lm_eval_xke.plugins.memit.config import MemitHyperParams

__all__ = ["FAMILY_DEFAULTS", "AlphaEditHyperParams"]


@dataclass
class AlphaEditHyperParams(MemitHyperParams):
    """Hyper-parameters of AlphaEdit (Fang et al. 2025); defaults follow its ``Llama3-8B.json``."""

    nullspace_threshold: float = field(
        default=2e-2,
        metadata={"help": "eigenvalues of the key second moment C below this span the preserved keys' null space"},
    )
    update_l2: float = field(
        default=10.0, metadata={"help": "ridge alpha of the projected update's (P (K^T K + K_p^T K_p) + alpha I)"}
    )
