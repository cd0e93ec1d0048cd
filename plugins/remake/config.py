"""ReMaKE hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import HyperParams

DEMO_MODES = ("zero", "few", "few-bi")


@dataclass
class RemakeHyperParams(HyperParams):
    """Retrieval-augmented multilingual knowledge editing (Wang et al. 2023); defaults follow the authors' code
    (16 bilingual demonstrations), except the retriever, which must work offline (see README)."""

    retriever: str = field(
        default="model",
        metadata={
            "help": "how questions and edits are embedded: 'model' (the evaluated model's own hidden state, "
            "PromptEOL) or 'sentence-transformers:NAME' (a model name or local folder; the paper's is "
            "paraphrase-multilingual-mpnet-base-v2; needs the sentence-transformers package)"
        },
    )
    embed_layer: int | None = field(
        default=None,
        metadata={
            "help": "retriever=model: block whose output is mean-pooled (negative counts from the last); "
            "none: three quarters of the depth (best of 1/4, 1/2, 3/4 on MzsRE with Qwen2.5-0.5B)"
        },
    )
    scope_threshold: float | None = field(
        default=None,
        metadata={
            "help": "cosine similarity from which a question is in the scope of its nearest edit; none: calibrated "
            "once per run on the translated training pools (translations and paraphrases vs unrelated questions)"
        },
    )
    calibration_records: int = field(
        default=32, metadata={"help": "training records whose questions (every pool language) calibrate the threshold"}
    )
    demos: str = field(
        default="few-bi",
        metadata={
            "help": "demonstrations before the retrieved edit: zero (none) | few (question-language pairs) | few-bi "
            "(edit-language pair followed by its question-language translation, the authors' format)"
        },
    )
    k: int = field(default=16, metadata={"help": "demonstrations retrieved from the pool (the authors: 16)"})
    pool_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder of zsre_mend_train_<code>_10000.txt pools (line-aligned translations); none: "
            "$XKE_DATA_DIR/train, checked against ReMaKE's sha256 pins"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the calibration records' sample"})
