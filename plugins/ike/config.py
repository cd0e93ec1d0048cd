"""IKE hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import HyperParams


@dataclass
class IkeHyperParams(HyperParams):
    """In-context knowledge editing (Zheng et al. 2023); defaults follow the paper's code and EasyEdit."""

    k: int = field(
        default=32, metadata={"help": "demonstrations retrieved from the pool per edit (the paper and EasyEdit: 32)"}
    )
    demo_ratio: list[int] = field(
        default_factory=lambda: [1, 3, 4],
        metadata={"help": "copy|update|retain proportions of the k demonstrations (the paper: 4, 12 and 16 of 32)"},
    )
    demo_pool: list[str] = field(
        default_factory=list,
        metadata={
            "help": "LANG:PATH files of training facts, record-aligned: .txt 'question<TAB>answer' lines, or .json "
            "ZsRE records {src, alt, rephrase, loc, loc_ans}; empty: the en/zh train files under $XKE_DATA_DIR/train"
        },
    )
    cross_lingual: bool = field(
        default=False,
        metadata={
            "help": "update demonstrations also ask a pool fact's question in its other languages, answered in that "
            "language (not in the paper, which is monolingual)"
        },
    )
    order_seed: int = field(default=0, metadata={"help": "seed of the shuffled order of demonstration kinds"})
