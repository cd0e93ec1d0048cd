"""FT-L / FT-M hyper-parameters and their defaults per model family."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import HyperParams

#: EasyEdit's values (lr 5e-4, 25 steps) with ROME's FT-L clamp (5e-4, GPT-2 XL) are the dataclass defaults: they
#: suit 7B models, whose MLP weights are small (LLaMA-2-7B down_proj: mean |w| ~0.015). The small models these
#: families are evaluated with here have ten times larger weights (SmolLM2-135M down_proj: mean |w| 0.15) and there
#: the 7B settings leave the model unchanged (FT-M reliability 0.0 on 10 Bi-ZsRE edits); 10x the learning rate and
#: a 2e-2 clamp (~13% of a typical weight) write every edit in about 10 steps. GPT-2's MLP output is ``c_proj``, a
#: ``Conv1D`` whose weight is stored ``[in, out]`` (the clamp is element-wise, so the layout does not matter).
SMALL_MODEL = {"lr": 5e-3, "norm_constraint": 2e-2}
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {"module_template": "model.layers.{}.mlp.down_proj", **SMALL_MODEL},
    "qwen2": {"module_template": "model.layers.{}.mlp.down_proj", **SMALL_MODEL},
    "gemma3_text": {"module_template": "model.layers.{}.mlp.down_proj", **SMALL_MODEL},
    "gpt2": {"module_template": "transformer.h.{}.mlp.c_proj", **SMALL_MODEL},
}

OPTIMIZERS = ("adam", "adamw", "sgd")

#: EasyEdit's ``FT/llama-7b.yaml`` @ 14cea82 on every family: lr 5e-4 and ``norm_constraint: false`` (unconstrained;
#: ROME's FT-L clamp 5e-4 is our dataclass default, the small-model families use lr 5e-3 with a 2e-2 clamp).
EASYEDIT_PRESET: dict[str, object] = {"lr": 5e-4, "norm_constraint": None}


@dataclass
class FtHyperParams(HyperParams):
    """Constrained fine-tuning (Zhu et al. 2020) as in EasyEdit's ``FT`` configs; FT-L and FT-M share them."""

    # EasyEdit's LLaMA-7B configuration fine-tunes layer 21 of 32: SmolLM2-135M's 20 of 30, Qwen2.5-0.5B's 16 of 24
    layers: list[int] = field(
        default_factory=lambda: [21],
        metadata={
            "help": "blocks whose module is fine-tuned (model_args: '20|21'; default: 21 of 32 as EasyEdit's "
            "LLaMA-7B, at the same relative depth of the loaded model)",
            "reference_depth": 32,
        },
    )
    module_template: str = field(
        default="model.layers.{}.mlp.down_proj",
        metadata={"help": "name of the fine-tuned module; '{}' is replaced by each layer; its `weight` is trained"},
    )
    num_steps: int = field(default=25, metadata={"help": "optimiser steps (full batch of all requests per step)"})
    lr: float = field(default=5e-4, metadata={"help": "learning rate"})
    optimizer: str = field(default="adam", metadata={"help": f"one of {', '.join(OPTIMIZERS)}"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the optimiser"})
    norm_constraint: float | None = field(
        default=5e-4,
        metadata={
            "help": "after every step each weight is clamped to within this L-infinity distance of its value before "
            "the edit (Zhu et al. 2020); none: unconstrained"
        },
    )
    early_stop_loss: float = field(
        default=1e-2, metadata={"help": "stop once the mean loss over the requests is below this (EasyEdit: 1e-2)"}
    )

    def module_names(self) -> list[str]:
        return [self.module_template.format(layer) for layer in self.layers]
