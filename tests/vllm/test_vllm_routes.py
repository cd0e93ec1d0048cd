"""How the vLLM backend routes what LoRA cannot carry: prefix-cache resets, HF fallbacks, prompt editors, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from vllm_cases import TINY_ROME, answer, assert_same_answers, requests

from lm_eval_xke.backends import vllm as vllm_backend
from lm_eval_xke.backends.vllm_engine import coerce_engine_value
from lm_eval_xke.editors import (
    AppliedEdit,
    Editor,
    EditorError,
    HyperParams,
    WeightDelta,
    apply_weight_deltas,
    register_editor,
)

# longer than one KV-cache block (128 tokens on CPU), so that a second request reuses cached keys and values
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
GREEDY_16 = {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}


def strong_delta(model: torch.nn.Module) -> WeightDelta:
    """A rank-one change of layer 0's MLP output large enough to change every later key and value."""
    weight = model.get_parameter("model.layers.0.mlp.down_proj.weight")
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(weight.shape[0], 1, generator=generator)
    a = torch.randn(1, weight.shape[1], generator=generator)
    return WeightDelta("model.layers.0.mlp.down_proj.weight", b * 0.5, a * 0.5)


@pytest.fixture
def backend(xke, tiny_llama_dir):
    """The LoRA engine of the llama tests: started by ROME edits, which size its adapters (rank 1, down_proj)."""
    lm = xke(tiny_llama_dir, **TINY_ROME)
    if lm.backend.llm is None:
        lm.loglikelihood(requests("loglikelihood"))
    return lm.backend


def generate_long(backend, *under) -> list[str]:
    instance = Instance("generate_until", {}, (LONG_PROMPT, dict(GREEDY_16)), 0)
    return backend.generate([instance], *under)


def test_prefix_cache_is_reset_after_every_weight_reload(backend):
    base = generate_long(backend)
    assert generate_long(backend) == base  # the second request reads the prompt's cached blocks
    edit = apply_weight_deltas(backend.model, [strong_delta(backend.model)])
    try:
        expected = generate_long(backend.hf)
        assert expected != base  # precondition: the edit changes the generation
        assert generate_long(backend, [(edit,)]) == expected
    finally:
        edit.restore()
    assert generate_long(backend) == base  # the restore is mirrored and its cache reset too


def test_without_the_reset_the_prefix_cache_would_answer_stale(backend, monkeypatch):
    # shows that the test above exercises the cache: skipping the reset gives an answer the edited model never gives
    generate_long(backend)
    monkeypatch.setattr(backend.llm, "reset_prefix_cache", lambda: True)
    edit = apply_weight_deltas(backend.model, [strong_delta(backend.model)])
    try:
        assert generate_long(backend, [(edit,)]) != generate_long(backend.hf)
    finally:
        edit.restore()
        generate_long(backend)  # mirror the restore back
        monkeypatch.undo()
        assert backend.llm.reset_prefix_cache()


@pytest.mark.parametrize(
    "parameter, rank",
    [
        ("model.layers.1.mlp.down_proj.weight", 2),  # above the engine's max_lora_rank of 1
        ("model.layers.1.self_attn.q_proj.weight", 1),  # not a LoRA target: q, k and v are reloaded as one qkv_proj
    ],
)
def test_deltas_the_adapters_cannot_hold_are_answered_in_place(backend, parameter, rank):
    rows, cols = backend.model.get_parameter(parameter).shape
    generator = torch.Generator().manual_seed(rank)
    b, a = torch.randn(rows, rank, generator=generator), torch.randn(rank, cols, generator=generator)
    edit = apply_weight_deltas(backend.model, [WeightDelta(parameter, b, a)])
    pairs = [("The capital city of Ruritania", " Berlin"), ("Water is made of", " hydrogen")]
    expected = backend.hf.readout(pairs)
    edit.restore()
    unedited = backend.hf.readout(pairs)
    assert [r.loglikelihood for r in expected] != pytest.approx([r.loglikelihood for r in unedited], abs=1e-2)
    before = backend.answered["in_place"]
    assert_same_readouts(backend.readout(pairs, [(edit,)] * len(pairs)), expected)
    assert backend.answered["in_place"] - before == 2
    assert_same_readouts(backend.readout(pairs), unedited)  # the originals are back in vLLM


def assert_same_readouts(ours: list, reference: list) -> None:
    assert [(r.answer, r.is_greedy) for r in ours] == [(r.answer, r.is_greedy) for r in reference]
    assert [r.loglikelihood for r in ours] == pytest.approx([r.loglikelihood for r in reference], abs=1e-3)


class HookEditor(Editor):
    """A memory editor in miniature: shifts one MLP's output through a forward hook, reports no deltas."""

    name = "hook_probe"
    hparams_class = HyperParams

    def apply(self, model, tokenizer, requests, hparams) -> AppliedEdit:
        handle = model.get_submodule("model.layers.1.mlp").register_forward_hook(lambda _m, _a, out: out + 0.5)
        return AppliedEdit(restore=handle.remove)


class SilentWeightEditor(Editor):
    """Changes a weight in place without reporting it as a delta: only the HF model knows what it did."""

    name = "silent_weights"
    hparams_class = HyperParams

    def apply(self, model, tokenizer, requests, hparams) -> AppliedEdit:
        edit = apply_weight_deltas(model, [strong_delta(model)])
        return AppliedEdit(restore=edit.restore)


class PromptEditor(Editor):
    """A prompt editor in miniature (IKE's shape): prepends the new fact to every question."""

    name = "prompt_probe"
    hparams_class = HyperParams
    supports_batch = True

    def apply(self, model, tokenizer, requests, hparams) -> AppliedEdit:
        facts = " ".join(f"{r.prompt} {r.target_new}." for r in requests)
        return AppliedEdit(prompt_transform=lambda prompt: f"{facts} {prompt}")


class QuestionPromptEditor(PromptEditor):
    """A prompt editor that reads the question (ReMaKE's and MIKE's shape): also tags it with language and role."""

    name = "question_probe"

    def apply(self, model, tokenizer, requests, hparams) -> AppliedEdit:
        facts = " ".join(f"{r.prompt} {r.target_new}." for r in requests)
        return AppliedEdit(question_transform=lambda prompt, question: f"{facts} [{question.lang}] {prompt}")


@pytest.mark.parametrize("editor_cls", [HookEditor, SilentWeightEditor])
def test_edits_vllm_cannot_replay_are_answered_by_hf(xke, tiny_llama_dir, editor_cls):
    register_editor(editor_cls.name, editor_cls)
    lm = xke(tiny_llama_dir, editor=editor_cls.name)
    hf_before = lm.backend.answered["hf"]
    ours = lm.loglikelihood(requests("loglikelihood"))
    reference = xke(tiny_llama_dir, editor=editor_cls.name, backend="hf").loglikelihood(requests("loglikelihood"))
    assert_same_answers(ours, reference)
    unedited = xke(tiny_llama_dir, editor="none", backend="hf").loglikelihood(requests("loglikelihood"))
    assert [r[0] for r in reference] != [r[0] for r in unedited]  # precondition: the edit changes the answers
    assert lm.backend.answered["hf"] - hf_before == 12  # the post questions, answered while each edit was applied
    assert lm.get_model_info()["xke"]["backend_settings"]["hf_fallbacks"]


def test_a_restored_edit_vllm_cannot_replay_is_refused(backend):
    edit = HookEditor().apply(backend.model, None, [], None)
    edit.restore()
    with pytest.raises(RuntimeError, match="cannot be replayed"):
        backend.readout([("Water is made of", " hydrogen")], [(edit,)])


@pytest.mark.parametrize("editor_cls", [PromptEditor, QuestionPromptEditor])
@pytest.mark.parametrize("protocol", ["loglikelihood", "generate_until"])
def test_prompt_editor_answers_on_the_base_model(xke, tiny_llama_dir, protocol, editor_cls):
    register_editor(editor_cls.name, editor_cls)
    batches = {"edit_mode": "batch", "edit_batch_size": 2}
    lm = xke(tiny_llama_dir, editor=editor_cls.name, **batches)
    before = dict(lm.backend.answered)
    ours = answer(lm, protocol, requests(protocol))
    hf = xke(tiny_llama_dir, editor=editor_cls.name, backend="hf", **batches)
    reference = answer(hf, protocol, requests(protocol))
    assert_same_answers(ours, reference)
    assert lm.backend.answered["base"] - before.get("base", 0) == 16  # pre and post questions, no adapter
    assert lm.backend.answered["lora"] == before.get("lora", 0)


def test_adapters_are_removed_after_the_call(xke, tiny_llama_dir, monkeypatch):
    lm = xke(tiny_llama_dir, **TINY_ROME)
    written: list[Path] = []
    write = vllm_backend.write_adapter

    def recorded(folder: Path, deltas) -> Path:
        written.append(write(folder, deltas))
        return written[-1]

    monkeypatch.setattr(vllm_backend, "write_adapter", recorded)
    lm.loglikelihood(requests("loglikelihood"))
    assert len(written) == 4 and not any(path.exists() for path in written)
    assert not lm.backend.llm.llm_engine.list_loras()


def test_sampling_is_refused(backend):
    instance = Instance("generate_until", {}, ("Hello", {"do_sample": True, "temperature": 0.7}), 0)
    with pytest.raises(EditorError, match="generates greedily"):
        backend.generate([instance])


@pytest.mark.parametrize(
    "model_args, message",
    [({"peft": "adapter"}, "cannot reproduce the HF model arguments peft"), ({"devise": "cpu"}, "unknown model_args")],
)
def test_arguments_vllm_cannot_honour_are_refused(tiny_llama_dir, model_args, message):
    from lm_eval_xke.model import XKELM

    with pytest.raises(EditorError, match=message):
        XKELM(pretrained=str(tiny_llama_dir), backend="vllm", **model_args)


def test_list_engine_arguments_are_written_with_bars():
    assert coerce_engine_value("lora_target_modules", "down_proj|up_proj") == ["down_proj", "up_proj"]
    assert coerce_engine_value("max_loras", 4) == 4
