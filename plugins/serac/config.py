"""SERAC hyper-parameters: the scope classifier's training, and the editor's use of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import HyperParams
from lm_eval_xke.training import TrainHyperParams

#: What the counterfactual model (the base model itself) is shown in front of an in-scope question.
COUNTERFACTUAL_TEMPLATE = "New Fact: {prompt} {target}\nPrompt: "


@dataclass
class SeracTrainHyperParams(TrainHyperParams):
    """Training of SERAC's scope classifier (Mitchell et al. 2022, embedding variant) on the base model's own
    mean-pooled hidden states. In-batch negatives, as in the paper's contrastive classifier training."""

    batch_size: int = field(default=16, metadata={"help": "records per step (their questions are in-batch negatives)"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the projection, scale and bias"})
    embed_layer: int | None = field(
        default=None,
        metadata={"help": "block whose output is mean-pooled (negative counts from the last); none: the middle one"},
    )
    proj_dim: int = field(default=256, metadata={"help": "width of the learned projection the cosine is taken in"})

    def block(self, num_layers: int) -> int:
        return num_layers // 2 if self.embed_layer is None else self.embed_layer % num_layers


@dataclass
class SeracHyperParams(HyperParams):
    """SERAC at edit time: the trained scope classifier folder and how the counterfactual model is prompted."""

    editor_checkpoint: str | None = field(
        default=None, metadata={"help": "folder written by `lm-eval-xke train serac` for this base model"}
    )
    scope_threshold: float = field(
        default=0.5, metadata={"help": "probability above which a question is in the scope of a remembered edit"}
    )
    counterfactual_template: str = field(
        default=COUNTERFACTUAL_TEMPLATE,
        metadata={"help": "context put before an in-scope question; {prompt} and {target} are the retrieved edit"},
    )
