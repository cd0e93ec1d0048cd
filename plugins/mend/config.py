"""MEND hyper-parameters: what the trained editor is (training) and which trained editor to use (editing)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import HyperParams
from lm_eval_xke.training import TrainHyperParams

#: Where MEND edits, per ``model.config.model_type``: the MLP output projections of the last three blocks (the
#: paper edits the MLPs of the last 3 blocks; EasyEdit's LLaMA config lists ``layers.29-31.mlp.*``).
TRAIN_FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {"module_template": "model.layers.{}.mlp.down_proj"},
    "qwen2": {"module_template": "model.layers.{}.mlp.down_proj"},
    "gemma3_text": {"module_template": "model.layers.{}.mlp.down_proj"},
    "gpt2": {"module_template": "transformer.h.{}.mlp.c_proj"},
}


@dataclass
class MendTrainHyperParams(TrainHyperParams):
    """MEND training (Mitchell et al. 2022); defaults follow EasyEdit's ``MEND/llama-7b.yaml`` except ``lr``
    (1e-6 there, for 7B and ~100k steps; 1e-4 trains the small configurations in ~1k steps)."""

    layers: list[int] = field(
        default_factory=lambda: [-3, -2, -1], metadata={"help": "edited blocks; negative counts from the last"}
    )
    module_template: str = field(
        default="model.layers.{}.mlp.down_proj", metadata={"help": "edited linear module; '{}' is the layer"}
    )
    rank: int = field(default=1920, metadata={"help": "rank of each low-rank residual block of the editor MLP"})
    n_hidden: int = field(default=1, metadata={"help": "hidden (ReLU) residual blocks of the editor MLP"})
    edit_lr: float = field(default=1e-4, metadata={"help": "initial per-layer edit step size (learned)"})
    lr_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the per-layer edit step sizes"})
    c_edit: float = field(default=0.1, metadata={"help": "weight of the edit loss (NLL of the edited answer)"})
    c_loc: float = field(default=1.0, metadata={"help": "weight of the locality loss (KL to the unedited model)"})

    def module_names(self, num_layers: int) -> list[str]:
        return [self.module_template.format(layer % num_layers) for layer in self.layers]


@dataclass
class MendHyperParams(HyperParams):
    """MEND at edit time: the trained editor folder (``lm-eval-xke train mend``)."""

    editor_checkpoint: str | None = field(
        default=None, metadata={"help": "folder written by `lm-eval-xke train mend` for this base model"}
    )
