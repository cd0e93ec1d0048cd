"""KN hyper-parameters and their defaults per model family."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import HyperParams

#: The knowledge neurons are the inputs of each layer's MLP output projection (the FFN's intermediate
#: activations). GPT-2's projection is ``c_proj``, a ``Conv1D`` whose weight is stored ``[in, out]``.
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {"module_template": "model.layers.{}.mlp.down_proj"},
    "qwen2": {"module_template": "model.layers.{}.mlp.down_proj"},
    "gemma3_text": {"module_template": "model.layers.{}.mlp.down_proj"},
    "gpt2": {"module_template": "transformer.h.{}.mlp.c_proj"},
}

#: What the attribution scores the neurons for: the token the model predicts now (the paper: the neurons that
#: express the fact being updated) or the edit's new target, teacher-forced.
ATTRIBUTE_TO = ("prediction", "target_new")


@dataclass
class KnHyperParams(HyperParams):
    """Hyper-parameters of KN (Dai et al. 2022); defaults follow the paper and EasyEdit's Bi-ZsRE configuration."""

    layers: list[int] = field(
        default_factory=list,
        metadata={"help": "layers whose neurons are searched (model_args: '10|11|12'); empty: every layer"},
    )
    module_template: str = field(
        default="model.layers.{}.mlp.down_proj",
        metadata={"help": "name of each layer's MLP output projection; '{}' is replaced by the layer index"},
    )
    ig_steps: int = field(
        default=20, metadata={"help": "Riemann steps m of the integrated gradients (the paper's m = 20)"}
    )
    adaptive_threshold: float = field(
        default=0.2,
        metadata={"help": "keep neurons whose attribution exceeds this fraction of the largest one (all layers)"},
    )
    max_neurons: int = field(
        default=0, metadata={"help": "edit at most this many neurons, the highest attributed first; 0: no cap"}
    )
    attribute_to: str = field(
        default="prediction",
        metadata={
            "help": "answer the neurons are attributed to: 'prediction' (the token the model predicts now: the "
            "neurons of the fact being updated, as in the paper) or 'target_new' (the new target's tokens)"
        },
    )
    refine: bool = field(
        default=False,
        metadata={"help": "attribute on context-prefixed copies of the prompt too, keep neurons shared by > p of them"},
    )
    p: float = field(
        default=0.4, metadata={"help": "with refine: the fraction of prompts a neuron must be found in (strictly more)"}
    )
    refine_templates: int = field(
        default=5, metadata={"help": "with refine: number of context prefixes sampled from the model"}
    )
    refine_template_length: int = field(
        default=10, metadata={"help": "with refine: token length of each sampled context prefix"}
    )
    # not `seed`: that model_arg is taken by the xke model itself and would never reach the editor
    template_seed: int = field(default=0, metadata={"help": "with refine: seed of the context-prefix sampling"})
    lr_scale: float = field(
        default=1.0,
        metadata={"help": "lambda2: the new token's unit output embedding is added times this and the slot's norm"},
    )
    erase_scale: float = field(
        default=1.0,
        metadata={
            "help": "lambda1: the old token's unit output embedding is subtracted times this and the slot's norm"
        },
    )
