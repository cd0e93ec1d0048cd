"""MEND on tiny random models: the gradient factors, the editor's update, exact restore, and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.teacher_forcing import build_edit_batch, target_log_probs
from lm_eval_xke.editors import EditorError
from lm_eval_xke.plugins.mend import MendEditor, MendTrainable, MendTrainHyperParams
from lm_eval_xke.plugins.mend.compute import gradient_factors, per_request_nll
from lm_eval_xke.testing import load_tiny, parameter_hashes, save_tiny_model, train_tiny_editor

REQUESTS = [
    EditRequest("The capital of France is", "France", "Rome", "en"),
    EditRequest("法国的首都是", "法国", "巴黎", "zh"),
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir) -> Path:
    """A MEND folder trained for a few steps on the tiny llama (through the real `lm-eval-xke train`)."""
    options = ["--steps", "4", "--val-size", "2", "--lr", "1e-3"]
    return train_tiny_editor(tmp_path_factory.mktemp("mend"), tiny_llama_dir, "mend", 20, *options)


def weight_gradient(model, tokenizer, name: str, requests) -> torch.Tensor:
    batch = build_edit_batch(tokenizer, requests, "cpu")
    weight = model.get_parameter(name)
    weight.requires_grad_(True)
    loss = per_request_nll(target_log_probs(model, batch, "target_new"), batch.target_mask).sum()
    return torch.autograd.grad(loss, [weight])[0]


@pytest.mark.parametrize(
    ("arch", "module"), [("llama", "model.layers.2.mlp.down_proj"), ("gpt2", "transformer.h.2.mlp.c_proj")]
)
def test_gradient_factors_rebuild_the_weight_gradient(tmp_path, arch, module):
    model, tokenizer = load_tiny(save_tiny_model(tmp_path / arch, arch))
    batch = build_edit_batch(tokenizer, REQUESTS, "cpu")
    flags = [p.requires_grad for p in model.parameters()]
    u, delta = gradient_factors(model, [module], batch)[module]
    assert [p.requires_grad for p in model.parameters()] == flags  # put back
    assert u.shape[0] == int(batch.attention_mask.sum())  # one factor pair per token
    rebuilt = delta.T @ u if arch == "llama" else u.T @ delta  # Conv1D stores [in, out]
    torch.testing.assert_close(
        rebuilt, weight_gradient(model, tokenizer, f"{module}.weight", REQUESTS), rtol=1e-4, atol=1e-6
    )


def test_an_untrained_editor_is_a_gradient_step(tiny_llama_dir):
    """Identity-initialised blocks and empty normalisation statistics: MEND starts as ``-edit_lr * grad``."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    hp = MendTrainHyperParams(layers=[-1], edit_lr=0.01)
    editor = MendTrainable(model, tokenizer, hp).eval()
    (delta,) = editor.deltas(REQUESTS)
    assert delta.parameter == "model.layers.3.mlp.down_proj.weight"
    expected = -0.01 * weight_gradient(model, tokenizer, delta.parameter, REQUESTS)
    torch.testing.assert_close(delta.dense().detach(), expected, rtol=1e-4, atol=1e-8)


def test_batch_edit_is_the_sum_of_single_edits_and_restores_exactly(trained, tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    before = parameter_hashes(model)
    editor = MendEditor()
    hp = editor.resolve_hparams("llama", overrides={"editor_checkpoint": str(trained)})
    singles = []
    for request in REQUESTS:
        edit = editor.apply(model, tokenizer, [request], hp)
        singles.append({d.parameter: d.dense() for d in edit.deltas})
        assert parameter_hashes(model) != before
        edit.restore()
        assert parameter_hashes(model) == before
    batch = editor.apply(model, tokenizer, REQUESTS, hp)
    n_tokens = sum(len(tokenizer(r.prompt + " " + r.target_new)["input_ids"]) - 1 for r in REQUESTS)  # all but the last
    assert [d.rank for d in batch.deltas] == [n_tokens] * 3 and batch.info["modules"][0].endswith("1.mlp.down_proj")
    for d in batch.deltas:
        torch.testing.assert_close(d.dense(), singles[0][d.parameter] + singles[1][d.parameter], rtol=1e-4, atol=1e-7)
    batch.restore()
    assert parameter_hashes(model) == before


def test_sequential_edits_restore_newest_first(trained, tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    before = parameter_hashes(model)
    editor = MendEditor()
    hp = editor.resolve_hparams("llama", overrides={"editor_checkpoint": str(trained)})
    first = editor.apply(model, tokenizer, REQUESTS[:1], hp)
    after_first = parameter_hashes(model)
    second = editor.apply(model, tokenizer, REQUESTS[1:], hp)  # its gradient is taken on the edited model
    second.restore()
    assert parameter_hashes(model) == after_first
    first.restore()
    assert parameter_hashes(model) == before


def test_editor_needs_a_checkpoint_of_this_model(trained, tmp_path):
    editor = MendEditor()
    model, tokenizer = load_tiny(save_tiny_model(tmp_path / "other", "llama", seed=1))
    with pytest.raises(EditorError, match="set editor_checkpoint=DIR"):
        editor.apply(model, tokenizer, REQUESTS, editor.resolve_hparams("llama"))
    hp = editor.resolve_hparams("llama", overrides={"editor_checkpoint": str(trained)})
    with pytest.raises(EditorError, match="was trained for base model"):
        editor.apply(model, tokenizer, REQUESTS, hp)


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_edits_through_the_lm_eval_cli(trained, tiny_llama_dir, data_dir, tmp_path, mode):
    env = {**os.environ, "XKE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    model_args = f"pretrained={tiny_llama_dir},editor=mend,editor_checkpoint={trained},edit_mode={mode}"
    if mode == "batch":
        model_args += ",edit_batch_size=2"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--tasks", "bizsre_zh", "--model", "xke",
         "--model_args", model_args, "--limit", "2", "--output_path", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    xke = results["config"]["xke"]
    assert xke["editor"] == "mend" and xke["n_edit_cases"] == 2 and xke["hparams"]["editor_checkpoint"] == str(trained)
    assert "reliability_zh_em,none" in results["results"]["bizsre_zh"]
