"""Unit tests of the example editor on tiny random models (lm_eval_xke.testing): it edits, stays within its
norm bound, and restores the model bit-exactly."""

from __future__ import annotations

import pytest
import torch
from xke_plugin_example import DownProjFineTuneEditor

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.testing import byte_level_tokenizer, tiny_causal_lm

REQUEST = EditRequest(prompt="The capital of Freedonia is", subject="Freedonia", target_new="Paris", lang="en")


def target_loss(model, tokenizer) -> float:
    from xke_plugin_example.editor import encode

    ids, labels = encode(tokenizer, REQUEST, "cpu")
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_lowers_target_loss_within_the_bound_and_restores_exactly(arch):
    model, tokenizer = tiny_causal_lm(arch), byte_level_tokenizer()
    editor = DownProjFineTuneEditor()
    hparams = editor.resolve_hparams(arch, overrides={"steps": 30, "max_norm_ratio": 0.5})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = target_loss(model, tokenizer)

    edit = editor.apply(model, tokenizer, [REQUEST], hparams)
    assert target_loss(model, tokenizer) < loss_before - 0.1
    (delta,) = edit.deltas
    weight_norm = float(before[delta.parameter].float().norm())
    assert float(delta.dense().norm()) <= 0.5 * weight_norm * (1 + 1e-5)
    assert delta.rank == hparams.rank

    edit.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tight_bound_limits_the_change():
    model, tokenizer = tiny_causal_lm("llama"), byte_level_tokenizer()
    editor = DownProjFineTuneEditor()
    edit = editor.apply(
        model, tokenizer, [REQUEST], editor.resolve_hparams("llama", overrides={"max_norm_ratio": 1e-3})
    )
    assert edit.info["delta_norm"] <= 1e-3 * float(model.get_parameter(edit.deltas[0].parameter).norm()) * 1.01
