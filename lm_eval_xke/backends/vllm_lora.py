"""Weight deltas as LoRA adapters: one PEFT folder per edit, readable by vLLM's multi-LoRA serving.

A :class:`~lm_eval_xke.editors.WeightDelta` of an ``nn.Linear`` weight ``W [out, in]`` is ``dW = b @ a`` with
``b [out, r]`` and ``a [r, in]``: exactly LoRA's ``lora_B @ lora_A``. With ``lora_alpha = r`` the scaling is 1,
so the adapter adds ``dW`` unchanged. Deltas of several modules (MEMIT's layers) go into one adapter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lm_eval_xke.editors import WeightDelta

#: vLLM accepts only these values of ``max_lora_rank`` (``vllm.config.lora.MaxLoRARanks``)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: PEFT's key prefix for a causal LM's modules
PEFT_PREFIX = "base_model.model."


def module_of(parameter: str) -> str:
    """``model.layers.5.mlp.down_proj.weight`` -> ``model.layers.5.mlp.down_proj``."""
    return parameter.rsplit(".", 1)[0]


def factors_per_module(deltas: Sequence[WeightDelta]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(B, A)`` per edited module; several deltas of one weight stack into one higher-rank pair (their sum)."""
    grouped: dict[str, list[WeightDelta]] = {}
    for delta in deltas:
        grouped.setdefault(module_of(delta.parameter), []).append(delta)
    return {
        module: (
            torch.cat([d.b.detach().float().cpu() for d in group], dim=1),
            torch.cat([d.a.detach().float().cpu() for d in group], dim=0),
        )
        for module, group in grouped.items()
    }


def adapter_rank(deltas: Sequence[WeightDelta]) -> int:
    """The LoRA rank an adapter of ``deltas`` needs: the largest stacked rank of one module."""
    ranks: dict[str, int] = {}
    for delta in deltas:
        module = module_of(delta.parameter)
        ranks[module] = ranks.get(module, 0) + delta.rank
    return max(ranks.values(), default=0)


def smallest_vllm_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def write_adapter(folder: Path, deltas: Sequence[WeightDelta]) -> Path:
    """Write ``deltas`` as a PEFT LoRA adapter in ``folder``; every module is zero-padded to the adapter's rank."""
    from safetensors.torch import save_file

    factors = factors_per_module(deltas)
    rank = max(b.shape[1] for b, _ in factors.values())
    tensors = {}
    for module, (b, a) in factors.items():
        pad = rank - b.shape[1]  # zero columns of B and rows of A add nothing to B @ A
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad)).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in factors}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder
