"""GRACE hyper-parameters and their defaults per model family."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import HyperParams

#: Where the codebook sits, per ``model.config.model_type``. EasyEdit's LLaMA-2-7B setting wraps
#: ``model.layers[27].mlp.down_proj`` of 32 layers (the dataclass default, placed at the same relative depth, 0.84, of
#: the loaded model): layer 25 of SmolLM2-135M (30 layers), 20 of Qwen2.5-0.5B (24), 15 of Gemma-3-270M (18) and 10 of
#: GPT-2 (12, whose MLP output is ``c_proj``).
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "gpt2": {"module_template": "transformer.h.{}.mlp.c_proj"},
}

#: "cold": a random vector, uniform in [0, 1) (GRACE and EasyEdit); "warm": the module's own output at the key.
VALUE_INITS = ("cold", "warm")


@dataclass
class GraceHyperParams(HyperParams):
    """Hyper-parameters of GRACE (Hartvigsen et al. 2023); defaults follow EasyEdit's ``GRACE/llama-7b.yaml``."""

    layer: int = field(
        default=27,
        metadata={
            "help": "index of the transformer block whose module holds the codebook (default: 27 of 32, at the same "
            "relative depth of the loaded model)",
            "reference_depth": 32,
        },
    )
    module_template: str = field(
        default="model.layers.{}.mlp.down_proj",
        metadata={"help": "name of the wrapped linear module; '{}' is replaced by `layer`"},
    )
    eps: float = field(
        default=1.0,
        metadata={
            "help": "initial deferral radius: Euclidean distance between module inputs within which a key answers"
        },
    )
    n_iter: int = field(default=50, metadata={"help": "Adam steps that train each new value"})
    edit_lr: float = field(default=1.0, metadata={"help": "Adam learning rate of the value"})
    val_init: str = field(
        default="cold",
        metadata={"help": "initial value: 'cold' (uniform random in [0, 1), as the paper) or 'warm' (module output)"},
    )
    # not `seed`: that model_arg is taken by the xke model itself and would never reach the editor
    init_seed: int = field(default=0, metadata={"help": "seed of the random 'cold' initial value"})

    @property
    def module_name(self) -> str:
        return self.module_template.format(self.layer)
