"""MEMIT and AlphaEdit: the closed-form updates, the editors on tiny models, and their edit modes."""

from __future__ import annotations

import pytest
import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import EditorError
from lm_eval_xke.plugins.alphaedit import AlphaEditEditor
from lm_eval_xke.plugins.alphaedit.compute import null_space_projection, projected_update
from lm_eval_xke.plugins.memit import MemitEditor
from lm_eval_xke.plugins.memit.compute import compute_ks, least_squares_update
from lm_eval_xke.testing import TINY_MEMIT_HPARAMS, parameter_hashes

TINY = TINY_MEMIT_HPARAMS
# random keys have no null space worth the name: keep every direction, and a ridge on the tiny keys' scale
ALPHA_TINY = {"nullspace_threshold": 1e9, "update_l2": 1e-4}


pytestmark = pytest.mark.usefixtures("one_thread")


def requests() -> list[EditRequest]:
    # on a random model only the token at the edited (subject-last) position can be steered: subjects end the prompt
    return [
        EditRequest(f"The capital city of {s}", s, t, "en")
        for s, t in (("Ruritania", "Berlin"), ("Freedonia", "Tokyo"), ("Elbonia", "Paris"))
    ]


def next_token(model, tokenizer, prompt: str) -> int:
    with torch.no_grad():
        return int(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax())


# ---------------------------------------------------------------- closed forms


def test_memit_least_squares_maps_the_edited_keys_to_their_targets():
    torch.manual_seed(0)
    keys, residual = torch.randn(4, 32), torch.randn(4, 16)
    c = torch.randn(200, 32)
    mom2 = c.T @ c / 200
    exact = residual.T @ least_squares_update(keys, mom2, lam=1e-8)
    assert torch.allclose(exact @ keys.T, residual.T, atol=1e-4)  # W' k_i = W k_i + r_i
    # lambda trades the fit for less change on typical (corpus) keys: tr(dW C dW^T) falls as lambda grows
    damped = residual.T @ least_squares_update(keys, mom2, lam=10.0)
    assert torch.trace(damped @ mom2 @ damped.T) < torch.trace(exact @ mom2 @ exact.T)
    # and dW solves the normal equations dW (lambda C + K^T K) = R^T K
    assert torch.allclose(damped @ (10.0 * mom2 + keys.T @ keys), residual.T @ keys, atol=1e-4)


def test_alphaedit_update_leaves_the_preserved_keys_unchanged():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32))[0]
    preserved_keys = torch.randn(300, 20) @ basis[:, :20].T  # preserved knowledge spans 20 of 32 dimensions
    mom2 = preserved_keys.T @ preserved_keys / 300
    projection = null_space_projection(mom2, threshold=1e-6)
    assert int(torch.trace(projection).round()) == 12
    keys, residual = torch.randn(3, 32), torch.randn(3, 16)
    d_w = residual.T @ projected_update(keys, projection, torch.zeros(32, 32, dtype=torch.float64), alpha=1e-6)
    assert (d_w @ preserved_keys.T).abs().max() < 1e-4  # dW K0^T = 0
    assert torch.allclose(d_w @ (projection.float() @ keys.T), residual.T, atol=1e-3)  # the projected keys land
    # earlier edits' keys K_p in the system disturb their values less than without them
    earlier = torch.randn(2, 32) @ projection.float()
    gram = (earlier.T @ earlier).double()
    with_p = residual.T @ projected_update(keys, projection, gram, alpha=1.0)
    without = residual.T @ projected_update(keys, projection, torch.zeros_like(gram), alpha=1.0)
    assert (with_p @ earlier.T).norm() < (without @ earlier.T).norm()


def test_keys_weigh_each_template_group_equally_as_the_memit_code(tiny):
    """MEMIT averages the keys per group (the bare prompt; the prefixes of one length), then over the groups."""
    model, tokenizer = tiny
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    request, templates = requests()[:1], ["{}", "Once upon a time. {}", "The war. {}"]
    each = torch.cat([compute_ks(model, tokenizer, module, request, [t], [1], "subject_last") for t in templates])
    grouped = compute_ks(model, tokenizer, module, request, templates, [1, 2], "subject_last")
    assert torch.allclose(grouped[0], each[0] / 2 + (each[1] + each[2]) / 4, atol=1e-6)
    flat = compute_ks(model, tokenizer, module, request, templates, [3], "subject_last")
    assert torch.allclose(flat[0], each.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="do not add up"):
        compute_ks(model, tokenizer, module, request, templates, [1, 1], "subject_last")


# ---------------------------------------------------------------- the editors


@pytest.mark.parametrize("editor_cls", [MemitEditor, AlphaEditEditor])
def test_a_batch_of_edits_lands_and_restores_bit_exactly(tiny, corpus, editor_cls):
    model, tokenizer = tiny
    editor = editor_cls()
    extra = ALPHA_TINY if editor_cls is AlphaEditEditor else {}
    hp = editor.resolve_hparams("llama", overrides={**TINY, "mom2_corpus": corpus, **extra})
    before = parameter_hashes(model)
    batch = requests()
    space = tokenizer(" B")["input_ids"][-2]  # the byte-level space every target starts with
    assert not any(next_token(model, tokenizer, r.prompt) == space for r in batch)
    edit = editor.apply(model, tokenizer, batch, hp)
    assert all(next_token(model, tokenizer, r.prompt) == space for r in batch)
    assert {d.parameter for d in edit.deltas} == {f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)}
    assert all(d.rank == 3 for d in edit.deltas)  # one key per request and layer
    assert max(edit.info["residual_left"]) < 0.5
    edit.restore()
    assert parameter_hashes(model) == before


def test_alphaedit_keeps_earlier_keys_until_each_edit_is_restored(tiny, corpus):
    model, tokenizer = tiny
    editor = AlphaEditEditor()
    hp = editor.resolve_hparams("llama", overrides={**TINY, "mom2_corpus": corpus, **ALPHA_TINY})
    first = editor.apply(model, tokenizer, requests()[:1], hp)
    second = editor.apply(model, tokenizer, requests()[1:2], hp)
    grams = editor._preserved[model]
    assert all(g.abs().sum() > 0 for g in grams.values())
    second.restore()
    first.restore()
    assert all(g.abs().max() < 1e-6 for g in grams.values())  # both edits' keys taken out again


def test_bad_settings_are_editor_errors(tiny, corpus):
    model, tokenizer = tiny
    for editor, overrides, message in [
        (MemitEditor(), {"layers": "2|1"}, "distinct and ascending"),
        (MemitEditor(), {"layers": "1|9"}, "model.layers.9.mlp.down_proj' not found"),
        (MemitEditor(), {"mom2_corpus": "klingon"}, "mom2_corpus: unknown corpus source"),
        (AlphaEditEditor(), {"nullspace_threshold": 1e-30}, "no eigenvalue .* below nullspace_threshold"),
    ]:
        hp = editor.resolve_hparams("llama", overrides={**TINY, "mom2_corpus": corpus, **overrides})
        with pytest.raises(EditorError, match=message):
            editor.apply(model, tokenizer, requests()[:1], hp)
