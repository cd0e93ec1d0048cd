"""LangEdit hyper-parameters: AlphaEdit's, plus the two weights of the code's covariance update between calls."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.plugins.alphaedit.config import FAMILY_DEFAULTS, AlphaEditHyperParams

__all__ = ["FAMILY_DEFAULTS", "LangEditHyperParams"]


@dataclass
class LangEditHyperParams(AlphaEditHyperParams):
    """Hyper-parameters of LangEdit (Sun et al. 2025); the blend weights are the constants of its code."""

    blend_corpus_count: float = field(
        default=100_000.0,
        metadata={
            "help": "N of the second moment's update before call t >= 1, C_t = N/(N+t m) C_(t-1) + m/(N+t m) S "
            "(S: summed K^T K of the edits in place); LangEdit's code hard-codes 100000, its mom2_n_samples"
        },
    )
    blend_edit_count: float = field(
        default=100.0,
        metadata={
            "help": "m of that update: how much the edits in place weigh against the corpus; 0 keeps AlphaEdit's "
            "fixed corpus null space; LangEdit's code hard-codes 100, its edits per call"
        },
    )
