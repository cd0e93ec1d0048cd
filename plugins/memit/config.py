"""MEMIT hyper-parameters and their defaults per model family."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import AtDepth
from lm_eval_xke.plugins.rome.config import EASYEDIT_VALUE_PRESET, ValueHyperParams

#: Where MEMIT writes, per ``model.config.model_type``, placed at the same relative depth of the loaded model (a range
#: maps its two ends). EasyEdit's LLaMA-7B layers 4-8 of 32 are the dataclass default (4-8 of SmolLM2-135M's 30
#: too); 4-8 were kept as the early-middle layers of Qwen2.5-0.5B (24 layers) and Gemma-3-270M (18), where the
#: README's numbers were measured, so those families scale from there. The original MEMIT edits GPT-2 XL's layers
#: 13-17 of 48; 3-5 of 12 is that depth for GPT-2. AlphaEdit and LangEdit spread over the same layers.
SPREAD_DEFAULTS: dict[str, dict[str, object]] = {
    "qwen2": {"layers": AtDepth((4, 5, 6, 7, 8), of=24)},
    "gemma3_text": {"layers": AtDepth((4, 5, 6, 7, 8), of=18)},
    "gpt2": {
        "layers": AtDepth((3, 4, 5), of=12),
        "module_template": "transformer.h.{}.mlp.c_proj",
        "layer_module_template": "transformer.h.{}",
    },
}

#: EasyEdit's ``mom2_update_weight`` 15000 for LLaMA-7B, whose ``down_proj`` input is 11008 wide: lambda per width.
LAMBDA_PER_WIDTH = 15000 / 11008

#: lambda per width where it was measured best: with 1.36 each edited layer of SmolLM2-135M writes under half of its
#: share of the residual (k^T (lambda C + K^T K)^-1 k ~ 0.47 for Bi-ZsRE subjects) and 17-28% of it is never written;
#: 0.6 writes all but 6-8% and doubles reliability at batch 10 (40 -> 80 EM) with locality unchanged; on
#: Qwen2.5-Coder-0.5B it is no worse on any metric (plugin README). Gemma and GPT-2 were not measured.
SMALL_MODEL_LAMBDA_PER_WIDTH = 0.6
#: MEMIT's own defaults: the spread layers, and lambda on the families measured (the others keep EasyEdit's ratio)
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    **SPREAD_DEFAULTS,
    "llama": {"lambda_per_width": SMALL_MODEL_LAMBDA_PER_WIDTH},
    "qwen2": {**SPREAD_DEFAULTS["qwen2"], "lambda_per_width": SMALL_MODEL_LAMBDA_PER_WIDTH},
}

#: EasyEdit's MEMIT (``memit/memit_main.py`` @ 14cea82): ROME's value procedure, and lambda 15000 on every model
#: (ours scales lambda with the module's width: 15000 on LLaMA-7B, 2093 on SmolLM2-135M).
EASYEDIT_PRESET: dict[str, object] = {**EASYEDIT_VALUE_PRESET, "mom2_update_weight": 15000.0}


@dataclass
class MemitHyperParams(ValueHyperParams):
    """Hyper-parameters of MEMIT (Meng et al. 2023); defaults follow EasyEdit's ``MEMIT/llama-7b.yaml``."""

    layers: list[int] = field(
        default_factory=lambda: [4, 5, 6, 7, 8],
        metadata={
            "help": "blocks whose MLP output projections share the update (model_args: '4|5|6|7|8', or 'auto': as many "
            "consecutive blocks where the causal trace of the model is largest; default: 4-8 of 32, at the same "
            "relative depth of the loaded model)",
            "reference_depth": 32,
            "traceable": True,
        },
    )
    module_template: str = field(
        default="model.layers.{}.mlp.down_proj",
        metadata={"help": "name of the edited linear module of a block; '{}' is replaced by the layer"},
    )
    layer_module_template: str = field(
        default="model.layers.{}",
        metadata={"help": "name of a whole block, whose output is the residual stream the targets are read from"},
    )
    # MEMIT's own code uses five 10-token context prefixes (plus the bare prompt), not ROME's twenty
    context_template_lengths: list[int] = field(
        default_factory=lambda: [10],
        metadata={"help": "token lengths of the generated context prefixes (model_args: '5|10')"},
    )
    context_templates_per_length: int = field(
        default=5, metadata={"help": "number of generated context prefixes per length"}
    )
    mom2_update_weight: float | None = field(
        default=None,
        metadata={
            "help": "lambda of the update's (lambda C + K K^T); default None: lambda_per_width x the module's input "
            "width, which is EasyEdit's 15000 on LLaMA-7B and scales with the width on other models"
        },
    )
    lambda_per_width: float = field(
        default=LAMBDA_PER_WIDTH,
        metadata={"help": "lambda / input width, used when mom2_update_weight is None (15000 / 11008)"},
    )

    def module_names(self) -> list[str]:
        return [self.module_template.format(layer) for layer in self.layers]

    def update_weight(self, width: int) -> float:
        return self.mom2_update_weight if self.mom2_update_weight is not None else self.lambda_per_width * width
