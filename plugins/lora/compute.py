"""LoRA adapters through ``peft``: attach, read back as low-rank weight deltas, detach without a trace.

An adapter on a linear ``W`` adds ``B @ A * alpha / r`` (``A``: ``[r, in]``, ``B``: ``[out, r]``). After training,
that product is exactly a rank-r :class:`~lm_eval_xke.editors.WeightDelta`, so the adapter is removed again
(``unload``: the original modules are put back, the model object is the one passed in) and the change is merged
into the base weights by ``apply_weight_deltas``, which restores them bit-exactly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from lm_eval_xke.editors import WeightDelta

from .config import LoraHyperParams

ADAPTER = "default"


def lora_config(hp: LoraHyperParams) -> LoraConfig:
    return LoraConfig(
        r=hp.rank,
        lora_alpha=hp.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(hp.target_modules),
        layers_to_transform=list(hp.layers) or None,
        bias="none",
    )


def missing_targets(model, target_modules: Sequence[str]) -> list[str]:
    """The target names that match no module of ``model`` (peft matches the last components of a module name)."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch inside the block only; the caller's RNG state (CPU and the model's GPU) is restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def attached_adapters(model, hp: LoraHyperParams) -> Iterator[list[torch.nn.Parameter]]:
    """Inject fresh adapters into ``model`` in place; yield their parameters; always unload them on exit.

    ``get_peft_model`` also switches off ``requires_grad`` of every base parameter: callers wrap this in
    ``frozen_parameters``, which restores the flags.
    """
    with warnings.catch_warnings():
        # nothing the user can act on: peft asks transformers for a deprecated attribute, and it switches on
        # fan_in_fan_out for GPT-2's Conv1D by itself (adapter_deltas reads the flag from each layer)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)
        peft_model = get_peft_model(model, lora_config(hp), adapter_name=ADAPTER)
    try:
        yield [p for name, p in model.named_parameters() if ".lora_" in name]
    finally:
        peft_model.unload()


@torch.no_grad()
def adapter_deltas(model) -> list[WeightDelta]:
    """Every adapter of ``model`` as a float32 ``WeightDelta`` of its base weight, in the weight's own layout.

    ``nn.Linear`` stores ``[out, in]``: ``dW = (B * s) @ A``. GPT-2's ``Conv1D`` stores ``[in, out]`` (peft's
    ``fan_in_fan_out``): ``dW = (B @ A)^T * s = A^T @ (B^T * s)``.
    """
    deltas = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        a = module.lora_A[ADAPTER].weight.detach().float()
        b = module.lora_B[ADAPTER].weight.detach().float() * module.scaling[ADAPTER]
        if module.fan_in_fan_out:
            b, a = a.T, b.T
        deltas.append(WeightDelta(parameter=f"{name}.weight", b=b.contiguous(), a=a.contiguous()))
    return deltas
