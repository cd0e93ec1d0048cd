"""LoRA editing on tiny random models: the edit lands, is exactly a low-rank WeightDelta per adapted module, and
leaves no trace of peft behind (same model object, same modules, no hooks, same flags, bit-exact weights)."""

from __future__ import annotations

import pytest
import torch
from lm_eval import simple_evaluate
from peft.tuners.lora import LoraLayer

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import EditorError
from lm_eval_xke.plugins.lora import LoraEditor
from lm_eval_xke.plugins.lora.compute import adapter_deltas, attached_adapters
from lm_eval_xke.testing import load_tiny, parameter_hashes, teacher_forced_argmax

TINY = {"lr": 0.01, "num_steps": 40}
EN = EditRequest("The capital of Ruritania is", "Ruritania", "X", "en")
ZH = EditRequest("水的沸点是", "水", "Q", "zh")


pytestmark = pytest.mark.usefixtures("one_thread")


def structure(model) -> dict:
    """Everything peft could leave behind: module objects by name, hooks, attributes, grad flags, mode."""
    return {
        "modules": {name: id(module) for name, module in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "attributes": set(vars(model)),
        "flags": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": model.training,
        "config": model.config.to_dict(),
    }


@pytest.mark.parametrize(("arch", "modules_per_layer"), [("llama", 2), ("qwen2", 2), ("gpt2", 1)])
def test_lora_writes_a_batch_as_low_rank_deltas_and_leaves_no_trace(arch, modules_per_layer, request):
    model, tokenizer = load_tiny(request.getfixturevalue(f"tiny_{arch}_dir"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    saved, shape = parameter_hashes(model), structure(model)
    assert teacher_forced_argmax(model, tokenizer, [EN, ZH]) == [False, False]

    editor = LoraEditor()
    hp = editor.resolve_hparams(arch, overrides=TINY)
    edit = editor.apply(model, tokenizer, [EN, ZH], hp)

    assert teacher_forced_argmax(model, tokenizer, [EN, ZH]) == [True, True]
    assert structure(model) == shape  # the adapters are gone: the edit is in the base weights
    assert len(edit.deltas) == 4 * modules_per_layer
    for delta in edit.deltas:
        weight = model.get_parameter(delta.parameter)
        assert delta.rank == hp.rank and delta.dense().shape == weight.shape
        assert torch.allclose(weight - before[delta.parameter], delta.dense(), atol=1e-6)
    changed = {n for n, h in parameter_hashes(model).items() if h != saved[n]}
    assert changed == {d.parameter for d in edit.deltas}
    edit.restore()
    assert parameter_hashes(model) == saved and structure(model) == shape


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deltas_equal_peft_own_merge(arch, request):
    """``B @ A * alpha / r`` in the weight's layout (GPT-2's Conv1D stores [in, out]) is what peft would merge."""
    model, _ = load_tiny(request.getfixturevalue(f"tiny_{arch}_dir"))
    hp = LoraEditor().resolve_hparams(arch, overrides={"rank": 4, "lora_alpha": 8})
    with attached_adapters(model, hp):
        for module in model.modules():
            if isinstance(module, LoraLayer):  # B starts at zero; give it values so the product is not trivial
                torch.nn.init.normal_(module.lora_B["default"].weight)
        deltas = adapter_deltas(model)
        expected = {
            f"{name}.weight": module.get_delta_weight("default")
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer)
        }
    assert {d.parameter for d in deltas} == set(expected)
    for delta in deltas:
        assert torch.allclose(delta.dense(), expected[delta.parameter], atol=1e-5)


def test_layers_and_seed(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    editor = LoraEditor()

    def deltas(**overrides):
        edit = editor.apply(model, tokenizer, [EN], editor.resolve_hparams("llama", overrides={**TINY, **overrides}))
        edit.restore()
        return {d.parameter: d.dense() for d in edit.deltas}

    only_one = deltas(layers="1", num_steps=5)
    assert set(only_one) == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}
    again = deltas(layers="1", num_steps=5)
    assert all(torch.equal(only_one[n], again[n]) for n in only_one)  # deterministic given init_seed
    other_seed = deltas(layers="1", num_steps=5, init_seed=1)
    assert not torch.allclose(
        only_one["model.layers.1.self_attn.q_proj.weight"], other_seed["model.layers.1.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"target_modules": "query|v_proj"}, r"target_modules \['query'\] match no module"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"layers": "4"}, r"layers \[4\] out of range"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
    ],
)
def test_bad_hyper_parameters_are_editor_errors(tiny_llama_dir, overrides, message):
    model, tokenizer = load_tiny(tiny_llama_dir)
    shape = structure(model)
    editor = LoraEditor()
    with pytest.raises(EditorError, match=message):
        editor.apply(model, tokenizer, [EN], editor.resolve_hparams("llama", overrides=overrides))
    assert structure(model) == shape


def test_a_failing_edit_still_removes_the_adapters(tiny_llama_dir, monkeypatch):
    model, tokenizer = load_tiny(tiny_llama_dir)
    saved, shape = parameter_hashes(model), structure(model)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("lm_eval_xke.plugins.lora.train", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        LoraEditor().apply(model, tokenizer, [EN], LoraEditor().resolve_hparams("llama"))
    assert structure(model) == shape and parameter_hashes(model) == saved


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_cli_path_on_bizsre(tiny_gpt2_dir, data_dir, monkeypatch, xke_tasks, mode):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    out = simple_evaluate(
        task_manager=xke_tasks,
        model="xke",
        model_args=f"pretrained={tiny_gpt2_dir},device=cpu,editor=lora,num_steps=5,edit_mode={mode},edit_batch_size=2",
        tasks=["bizsre_en"],
        limit=2,
    )
    xke = out["config"]["xke"]
    assert xke["editor"] == "lora" and xke["edit_mode"] == mode and xke["n_edit_cases"] == 2
    assert xke["hparams"]["target_modules"] == ["c_attn"] and xke["hparams"]["num_steps"] == 5
    assert "reliability_en_em,none" in out["results"]["bizsre_en"]
