"""LoRA editing hyper-parameters and their defaults per model family."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm_eval_xke.editors import HyperParams
from lm_eval_xke.plugins.ft.config import OPTIMIZERS

#: The adapted modules per ``model.config.model_type``: EasyEdit's attention query and value projections; GPT-2
#: fuses q, k and v into one ``Conv1D`` (``c_attn``, peft's own default for GPT-2).
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {"target_modules": ["q_proj", "v_proj"]},
    "qwen2": {"target_modules": ["q_proj", "v_proj"]},
    "gemma3_text": {"target_modules": ["q_proj", "v_proj"]},
    "gpt2": {"target_modules": ["c_attn"]},
}


@dataclass
class LoraHyperParams(HyperParams):
    """LoRA editing; defaults follow EasyEdit's ``LoRA/llama-7b.yaml`` (plain LoRA, not its AdaLoRA option)."""

    rank: int = field(default=8, metadata={"help": "rank r of every adapter"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is B @ A * alpha / rank"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "names (last name component) of the adapted linear modules (model_args: 'q_proj|v_proj')"},
    )
    layers: list[int] = field(
        default_factory=list, metadata={"help": "blocks to adapt (model_args: '10|11'); empty: every block"}
    )
    num_steps: int = field(default=70, metadata={"help": "optimiser steps (full batch of all requests per step)"})
    lr: float = field(default=5e-3, metadata={"help": "learning rate"})
    optimizer: str = field(default="adam", metadata={"help": f"one of {', '.join(OPTIMIZERS)}"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the optimiser"})
    early_stop_loss: float = field(
        default=1e-2,
        metadata={"help": "stop once the mean target NLL is below this (FT's 1e-2; 0: always num_steps, as EasyEdit)"},
    )
    # not `seed`: that model_arg is taken by the xke model itself and would never reach the editor
    init_seed: int = field(default=0, metadata={"help": "seed of the adapters' random initialisation (A)"})
