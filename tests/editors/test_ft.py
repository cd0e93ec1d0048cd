"""FT-L and FT-M on tiny random models: the edit lands, stays inside its L-inf ball, restores bit-exactly.

A random 4-layer model's MLP outputs are tiny, so the tests use a larger learning rate and clamp than the family
defaults (which are tuned for SmolLM2-135M) and two-token targets (the byte-level space and one letter).
"""

from __future__ import annotations

import pytest
import torch
from lm_eval import simple_evaluate

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.teacher_forcing import build_edit_batch
from lm_eval_xke.editors import EditorError
from lm_eval_xke.model import XKELM
from lm_eval_xke.plugins.ft import FtLEditor, FtMEditor
from lm_eval_xke.plugins.ft.compute import edit_loss
from lm_eval_xke.testing import load_tiny, parameter_hashes, teacher_forced_argmax

TINY = {"lr": 0.02, "norm_constraint": 0.05, "num_steps": 15}
EN = EditRequest("The capital of Ruritania is", "Ruritania", "X", "en")
ZH = EditRequest("水的沸点是", "水", "Q", "zh")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ft_m_writes_both_facts_of_a_batch_and_restores_bit_exactly(arch_dir):
    arch, path = arch_dir
    model, tokenizer = load_tiny(path)
    saved = parameter_hashes(model)
    assert teacher_forced_argmax(model, tokenizer, [EN, ZH]) == [False, False]

    editor = FtMEditor()
    edit = editor.apply(model, tokenizer, [EN, ZH], editor.resolve_hparams(arch, overrides=TINY, num_layers=4))

    assert teacher_forced_argmax(model, tokenizer, [EN, ZH]) == [True, True]
    assert edit.deltas == () and edit.info["final_loss"] < edit.info["initial_loss"]
    (name,) = edit.info["parameters"]
    assert name == editor.resolve_hparams(arch).module_template.format(3) + ".weight"  # 21 of 32 is 3 of 4
    changed = {n for n, h in parameter_hashes(model).items() if h != saved[n]}
    assert changed == {name}
    edit.restore()
    assert parameter_hashes(model) == saved
    edit.restore()  # a second restore is a no-op
    assert parameter_hashes(model) == saved


def test_ft_l_moves_the_whole_target_to_the_prompts_last_token(tiny_llama_dir):
    """FT-L scores every target token at the prompt's last position: the target tokens become its top answers."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    batch = build_edit_batch(tokenizer, [EN], "cpu")
    target = set(batch.target_ids[0].tolist())

    def top_two() -> set[int]:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids).logits[0, batch.read_cols[0, 0]]
        return set(logits.topk(2).indices.tolist())

    assert top_two() != target
    editor = FtLEditor()
    hp = editor.resolve_hparams("llama", overrides={**TINY, "num_steps": 25}, num_layers=4)
    edit = editor.apply(model, tokenizer, [EN], hp)
    assert top_two() == target
    assert edit.info["objective"] == "prompt_last"
    with torch.no_grad():  # the teacher-forced loss (FT-M's) was not what FT-L optimised: it stays high
        assert edit_loss(model, batch, "prompt_last") < edit_loss(model, batch, "target_new")


def test_norm_constraint_bounds_every_weight_change(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    editor = FtMEditor()
    hp = editor.resolve_hparams("llama", overrides={**TINY, "norm_constraint": 1e-3, "layers": "1|2"})
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    before = {name: model.get_parameter(name).detach().clone() for name in names}
    edit = editor.apply(model, tokenizer, [EN], hp)
    assert edit.info["parameters"] == names
    for name in names:
        change = model.get_parameter(name).detach() - before[name]
        assert 0 < change.abs().max() <= 1e-3 * (1 + 1e-5)  # the bound, up to float32 rounding of original + eps
        assert edit.info["delta_linf"][name] == pytest.approx(change.abs().max().item())


def test_same_edit_twice_gives_identical_weights(tiny_qwen2_dir):
    model, tokenizer = load_tiny(tiny_qwen2_dir)
    editor = FtMEditor()
    hp = editor.resolve_hparams("qwen2", overrides=TINY, num_layers=4)
    weights = []
    for _ in range(2):
        edit = editor.apply(model, tokenizer, [EN], hp)
        weights.append(model.get_parameter(edit.info["parameters"][0]).detach().clone())
        edit.restore()
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layers": [7]}, r"layers \[7\] out of range: the model has 4 layers"),
        ({"layers": []}, "layers is empty: name at least one block"),
        ({"module_template": "model.layers.{}.mlp.up"}, "has no weight.*set module_template"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of adam, adamw, sgd"),
        ({"num_steps": 0}, "num_steps must be >= 1"),
        ({"lr": 0}, "lr must be > 0"),
        ({"norm_constraint": -1}, "norm_constraint must be > 0"),
    ],
)
def test_bad_hyper_parameters_are_editor_errors(tiny_llama_dir, overrides, message):
    model, tokenizer = load_tiny(tiny_llama_dir)
    editor = FtMEditor()
    with pytest.raises(EditorError, match=message):
        editor.apply(model, tokenizer, [EN], editor.resolve_hparams("llama", overrides=overrides, num_layers=4))


def test_bad_model_args_are_refused_before_loading_any_data(tiny_llama_dir):
    with pytest.raises(EditorError, match="hyper-parameter 'lr' of editor 'ft_l' must be float"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="ft_l", lr="fast")
    with pytest.raises(EditorError, match="unknown model_args.*norm_constraint"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="ft_m", clamp=1)


@pytest.mark.parametrize(("editor", "mode"), [("ft_m", "single"), ("ft_l", "batch")])
def test_cli_path_on_bizsre(tiny_llama_dir, data_dir, monkeypatch, xke_tasks, editor, mode):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    args = ",".join(f"{k}={v}" for k, v in TINY.items())
    out = simple_evaluate(
        task_manager=xke_tasks,
        model="xke",
        model_args=f"pretrained={tiny_llama_dir},device=cpu,editor={editor},{args},edit_mode={mode},edit_batch_size=2",
        tasks=["bizsre_zh"],
        limit=2,
    )
    xke = out["config"]["xke"]
    assert xke["editor"] == editor and xke["edit_mode"] == mode and xke["n_edit_cases"] == 2
    assert xke["hparams"]["lr"] == TINY["lr"] and xke["hparams"]["norm_constraint"] == TINY["norm_constraint"]
    assert xke["edit_seconds_total"] > 0
    assert "reliability_zh_em,none" in out["results"]["bizsre_zh"]
