"""LangEdit: the blended null space, and the editor's cross-language protection, restore and per-language state."""

from __future__ import annotations

import pytest
import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import EditorError, get_editor
from lm_eval_xke.plugins.alphaedit import AlphaEditEditor
from lm_eval_xke.plugins.alphaedit.compute import null_space_projection
from lm_eval_xke.plugins.langedit import LangEditEditor
from lm_eval_xke.plugins.langedit.compute import blend_coefficients, blended_second_moment, language_null_space
from lm_eval_xke.plugins.memit.compute import compute_ks
from lm_eval_xke.testing import TINY_MEMIT_HPARAMS, parameter_hashes

TINY = {**TINY_MEMIT_HPARAMS, "update_l2": 1e-4}
# The tiny corpus moment's eigenvalues are <= 0.0064 and an edited key's squared norm ~0.01-0.03: once the corpus
# weighs almost nothing in the blend (N = 1e-6, m = 1), the threshold 1e-3 keeps every direction but those of the
# earlier edits' keys. (LangEdit's N = 1e5, m = 100 assume LLaMA-sized keys.)
PROTECT = {"nullspace_threshold": 1e-3, "blend_corpus_count": 1e-6, "blend_edit_count": 1.0}
MODULES = ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")

pytestmark = pytest.mark.usefixtures("one_thread")


def request(lang: str) -> EditRequest:
    # on a random model only the subject-last position can be steered: the subject ends the prompt
    subject, target = {"en": ("Ruritania", "Berlin"), "zh": ("Freedonia", "Tokyo"), "de": ("Elbonia", "Paris")}[lang]
    return EditRequest(f"The capital city of {subject}", subject, target, lang)


def hparams(editor, corpus: str, **extra):
    return editor.resolve_hparams("llama", overrides={**TINY, "mom2_corpus": corpus, **PROTECT, **extra})


# ---------------------------------------------------------------- closed forms


def test_blend_coefficients_unroll_the_codes_recursion():
    torch.manual_seed(0)
    n, m = 1000.0, 10.0
    c0 = torch.randn(40, 8).double()
    c0 = c0.T @ c0 / 40
    keys = [torch.randn(3, 8).double() for _ in range(4)]
    recursive = c0
    for t in range(1, 5):  # C_t = N/(N+tm) C_(t-1) + m/(N+tm) sum_(j<t) K_j^T K_j
        s = sum(k.T @ k for k in keys[:t])
        recursive = n / (n + t * m) * recursive + m / (n + t * m) * s
    alpha, betas = blend_coefficients(4, n, m)
    assert len(betas) == 4 and betas[0] > betas[-1]  # the oldest edit weighs most
    assert torch.allclose(blended_second_moment(c0, keys, alpha, betas), recursive, atol=1e-12)
    assert blend_coefficients(0, n, m) == (1.0, [])


def test_language_null_space_excludes_earlier_keys_and_keeps_the_corpus_null_space():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32))[0]
    corpus_keys = torch.randn(300, 20) @ basis[:, :20].T  # the corpus spans 20 of 32 dimensions
    mom2 = corpus_keys.T @ corpus_keys / 300
    earlier = torch.randn(3, 12) @ basis[:, 20:].T  # an earlier language's keys, in the corpus null space
    static = null_space_projection(mom2, 1e-6)
    assert (static.float() @ earlier.T).norm() > 0.5 * earlier.norm()  # AlphaEdit's P does not exclude them
    moved = language_null_space(mom2, [earlier], 1e-6, corpus_count=100.0, edit_count=1.0)
    assert int(torch.trace(moved).round()) == 12 - 3
    assert (moved.float() @ earlier.T).norm() < 1e-5 * earlier.norm()  # ... LangEdit's does
    assert (moved.float() @ corpus_keys.T).norm() < 1e-5 * corpus_keys.norm()
    # m = 0: the blend is C_0 and P_t is AlphaEdit's
    assert torch.equal(language_null_space(mom2, [earlier], 1e-6, 100.0, 0.0), static)


# ---------------------------------------------------------------- the editor


def en_keys_and_change(editor, model, tokenizer, hp) -> tuple[dict, dict]:
    """Edit en then zh; per module the en keys (as remembered: on the model after the en edit) and the zh update's
    change on them relative to ``||dW_zh||_2 ||k_en||`` (what an unprotected key of that norm could see)."""
    first = editor.apply(model, tokenizer, [request("en")], hp)
    templates = editor.context_templates(model, tokenizer, hp)
    keys = {
        m: compute_ks(
            model, tokenizer, model.get_submodule(m), [request("en")], templates, hp.template_groups(), "subject_last"
        )
        for m in MODULES
    }
    if isinstance(editor, LangEditEditor):  # the keys it remembered are these
        assert all(torch.equal(editor._steps[model][0].keys[m], keys[m].double()) for m in MODULES)
    second = editor.apply(model, tokenizer, [request("zh")], hp)
    change = {}
    for m in MODULES:
        (delta,) = [d for d in second.deltas if d.parameter == f"{m}.weight"]
        d_w = delta.dense()
        change[m] = ((keys[m] @ d_w.T).norm() / (torch.linalg.matrix_norm(d_w, ord=2) * keys[m].norm())).item()
    second.restore()
    first.restore()
    return keys, change


def test_a_later_language_leaves_the_earlier_languages_keys_unchanged(tiny, corpus):
    """The paper's property, dW_zh K_en = 0; AlphaEdit only damps that change through K_p^T K_p in its solve."""
    model, tokenizer = tiny
    before = parameter_hashes(model)
    langedit = LangEditEditor()
    keys, moved = en_keys_and_change(langedit, model, tokenizer, hparams(langedit, corpus))
    assert parameter_hashes(model) == before
    alphaedit = AlphaEditEditor()
    hp = alphaedit.resolve_hparams(
        "llama", overrides={**TINY, "mom2_corpus": corpus, "nullspace_threshold": PROTECT["nullspace_threshold"]}
    )
    _, damped = en_keys_and_change(alphaedit, model, tokenizer, hp)
    assert parameter_hashes(model) == before
    for m in MODULES:
        assert moved[m] < 1e-5, (m, moved, damped)
        assert damped[m] > 100 * moved[m], (m, moved, damped)


def test_sequential_edits_in_two_languages_restore_bit_exactly_with_their_state(tiny, corpus):
    model, tokenizer = tiny
    assert get_editor("langedit") is LangEditEditor  # the entry point
    editor = LangEditEditor()
    hp = hparams(editor, corpus)
    before = parameter_hashes(model)
    first = editor.apply(model, tokenizer, [request("en"), request("de")], hp)  # a mixed-language call
    after_first = {m: {k: v.clone() for k, v in editor.preserved_by_language(model, m).items()} for m in MODULES}
    second = editor.apply(model, tokenizer, [request("zh")], hp)
    assert (first.info["earlier_steps"], first.info["earlier_languages"]) == (0, [])
    assert (second.info["earlier_steps"], second.info["earlier_languages"]) == (1, ["de", "en"])
    for m in MODULES:  # the corpus weighs ~nothing in this blend: the null space is that of the en/de keys
        keys = editor._steps[model][0].keys[m]
        lifted = int((torch.linalg.eigvalsh(keys.T @ keys) >= PROTECT["nullspace_threshold"]).sum())
        assert lifted >= 1 and second.info["null_space_rank"][m] == keys.shape[1] - lifted
    for m in MODULES:
        grams = editor.preserved_by_language(model, m)
        assert sorted(grams) == ["de", "en", "zh"] and all(g.abs().sum() > 0 for g in grams.values())
        keys = editor._steps[model][0].keys[m]
        assert torch.allclose(grams["en"] + grams["de"], keys.T @ keys)
    second.restore()
    for m in MODULES:  # the zh step is gone, the en/de one untouched
        grams = editor.preserved_by_language(model, m)
        assert sorted(grams) == ["de", "en"] and all(torch.equal(grams[k], after_first[m][k]) for k in grams)
    first.restore()
    assert parameter_hashes(model) == before
    assert all(editor.preserved_by_language(model, m) == {} for m in MODULES)
    # nothing of either edit is left: the same first edit again is bit-identical
    again = editor.apply(model, tokenizer, [request("en"), request("de")], hp)
    assert again.info["earlier_steps"] == 0
    assert all(torch.equal(a.dense(), b.dense()) for a, b in zip(again.deltas, first.deltas, strict=True))
    again.restore()
    assert parameter_hashes(model) == before


def test_bad_settings_are_editor_errors(tiny, corpus):
    model, tokenizer = tiny
    editor = LangEditEditor()
    for overrides, message in [
        ({"blend_corpus_count": 0.0}, "blend_corpus_count must be > 0"),
        ({"blend_edit_count": -1.0}, "blend_edit_count must be >= 0"),
        ({"nullspace_threshold": 1e-30}, "no eigenvalue .* below nullspace_threshold"),
    ]:
        with pytest.raises(EditorError, match=message):
            editor.apply(model, tokenizer, [request("en")], hparams(editor, corpus, **overrides))
