"""ROME on tiny random models: the edit lands, restores bit-exactly and is exposed as a rank-one weight delta.

On a random model only the token predicted *at* the edited position can be steered: later target tokens would
need the downstream circuitry of a trained model to read the new value back (a random 4-layer model's attention
is near uniform and tiny, so no delta at the subject reaches them). The tests therefore check the write itself
(``W' k = v*``), the first target token, the drop of the target NLL, and everything around the update.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm_eval_xke import stats
from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing import rewriting
from lm_eval_xke.editing.hooks import trace_module
from lm_eval_xke.editing.rewriting import ValueBatch, cached_forward, full_forward, reference_pass
from lm_eval_xke.editing.templates import context_templates, generate_context_templates
from lm_eval_xke.editing.tokens import fact_token_index, split_prompt_target
from lm_eval_xke.editors import EditorError, apply_weight_deltas
from lm_eval_xke.plugins.none import NoEditor
from lm_eval_xke.plugins.rome import RomeEditor, RomeHyperParams
from lm_eval_xke.plugins.rome import compute_v as value_step
from lm_eval_xke.plugins.rome.compute import compute_k, compute_right, compute_u, rank_one_delta
from lm_eval_xke.plugins.rome.compute_v import build_value_batch, compute_v, converged
from lm_eval_xke.testing import load_tiny, parameter_hashes

# Small template set and no weight decay: a random model's values are tiny (||v_init|| ~ 0.02), so the
# default decay and clamp (relative to ||v_init||) would hold delta near zero.
FAST = {
    "layer": 1,
    "context_template_lengths": [5],
    "context_templates_per_length": 5,
    "clamp_norm_factor": 100.0,
    "v_weight_decay": 0.0,
}
# the subject ends the prompt, so the first target token is predicted at the edited position
EN = EditRequest("The capital of France", "France", "Rome", "en")
ZH = EditRequest("法国的首都是", "法国", "巴黎", "zh")


pytestmark = pytest.mark.usefixtures("one_thread")


def hparams(model_type: str, **overrides) -> RomeHyperParams:
    return RomeEditor().resolve_hparams(model_type, overrides={**FAST, **overrides})


def target_logprobs(model, tokenizer, request: EditRequest) -> tuple[torch.Tensor, list[int]]:
    """Teacher-forced log-probs at the target positions of ``prompt + " " + target``, and the target ids."""
    prompt_ids, target_ids = split_prompt_target(tokenizer, request.prompt, request.target_new)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + target_ids[:-1]])).logits[0]
    return logits[len(prompt_ids) - 1 :].log_softmax(-1), target_ids


def target_nll(model, tokenizer, request: EditRequest) -> float:
    log_probs, target_ids = target_logprobs(model, tokenizer, request)
    return -log_probs[torch.arange(len(target_ids)), torch.tensor(target_ids)].mean().item()


# ---------------------------------------------------------------- tokens and positions


@pytest.mark.parametrize(("prompt", "target"), [("The capital of France is", "Rome"), ("法国的首都是", "巴黎")])
def test_split_prompt_target_gives_the_joining_space_to_the_target(tiny_llama_dir, prompt, target):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt_ids, target_ids = split_prompt_target(tokenizer, prompt, target)
    assert prompt_ids == tokenizer(prompt)["input_ids"]
    assert prompt_ids + target_ids == tokenizer(prompt + " " + target)["input_ids"]
    assert tokenizer.decode(target_ids) == " " + target
    assert target_ids == tokenizer(" " + target, add_special_tokens=False)["input_ids"]


def test_split_prompt_target_matches_lm_eval_encode_pair(tiny_llama_dir):
    """The edit learns exactly the ids that the teacher-forced read-out (lm-eval's HFLM) scores."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tiny_llama_dir), device="cpu", dtype="float32")
    for prompt, target in [("The capital of France is", "Rome"), ("法国的首都是", "巴黎"), ("Q: trailing space ", "X")]:
        assert split_prompt_target(lm.tokenizer, prompt, target) == lm._encode_pair(prompt, " " + target)


def test_fact_token_index_finds_the_subject_in_the_prompt_not_in_the_prefix(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    template = "France and 法国 are big. {}"
    for prompt, subject in [("The capital of France is", "France"), ("法国的首都是", "法国")]:
        ids = tokenizer(template.format(prompt))["input_ids"]
        index = fact_token_index(tokenizer, template, prompt, subject, "subject_last")
        head = tokenizer.decode(ids[: index + 1], skip_special_tokens=True)
        assert head == template.format(prompt[: prompt.index(subject) + len(subject)])
        assert fact_token_index(tokenizer, template, prompt, subject, "last") == len(ids) - 1


def test_context_templates_are_seeded_cached_and_leave_the_global_rng_alone(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    hp = hparams("llama")
    settings = (hp.context_template_lengths, hp.context_templates_per_length, hp.template_seed)
    rng = torch.random.get_rng_state()
    templates = context_templates(model, tokenizer, *settings)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert templates[0] == "{}" and len(templates) == 1 + 5
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1:])
    assert context_templates(model, tokenizer, *settings) is templates  # cached per model and settings
    assert generate_context_templates(model, tokenizer, *settings) == templates  # seeded: reproducible
    assert context_templates(model, tokenizer, *settings[:2], 1) != templates


# ---------------------------------------------------------------- the edit


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_edit_lands_on_the_edit_prompt(arch, request):
    """(a) The first target token flips to the target and the target NLL falls."""
    model, tokenizer = load_tiny(request.getfixturevalue(f"tiny_{arch}_dir"))
    log_probs, target_ids = target_logprobs(model, tokenizer, EN)
    assert log_probs[0].argmax().item() != target_ids[0]
    nll_before = target_nll(model, tokenizer, EN)

    edit = RomeEditor().apply(model, tokenizer, [EN], hparams(arch))

    log_probs, _ = target_logprobs(model, tokenizer, EN)
    assert log_probs[0].argmax().item() == target_ids[0]
    assert target_nll(model, tokenizer, EN) < nll_before - 0.1
    (record,) = edit.info["requests"]
    assert record["steps"] > 0 and record["nll"] < nll_before and record["delta_norm"] > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rank_one_update_writes_v_star_at_the_subject_key(arch, request):
    """(a, d) ``(W + right ⊗ u) k = v*``, in nn.Linear's [out, in] and GPT-2 Conv1D's [in, out] layout."""
    model, tokenizer = load_tiny(request.getfixturevalue(f"tiny_{arch}_dir"))
    hp = hparams(arch)
    module = model.get_submodule(hp.module_name)
    templates = context_templates(
        model, tokenizer, hp.context_template_lengths, hp.context_templates_per_length, hp.template_seed
    )
    u = compute_u(compute_k(model, tokenizer, module, EN, templates, hp.fact_token))
    solution = compute_v(model, tokenizer, module, EN, templates, hp)
    delta = rank_one_delta(f"{hp.module_name}.weight", module, u, compute_right(u, solution))
    if arch == "gpt2":  # Conv1D weight is [in=256, out=64]
        assert delta.b.shape == (256, 1) and delta.a.shape == (1, 64)
    else:  # Linear weight is [out=64, in=128]
        assert delta.b.shape == (64, 1) and delta.a.shape == (1, 128)
    apply_weight_deltas(model, [delta])

    ids = tokenizer(EN.prompt)["input_ids"]
    with torch.no_grad(), trace_module(module) as record:
        model(torch.tensor([ids]))
    position = fact_token_index(tokenizer, "{}", EN.prompt, EN.subject, "subject_last")
    assert torch.allclose(record["input"][0, position], solution.k_plain, atol=1e-6)
    assert torch.allclose(record["output"][0, position], solution.v_star, rtol=1e-4, atol=1e-5)


def test_weight_delta_is_rank_one_on_the_edited_module_only(arch_dir):
    """(c, d) Only the edited weight changes, by exactly ``delta.dense()``, which has rank one."""
    arch, path = arch_dir
    model, tokenizer = load_tiny(path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = hparams(arch)

    edit = RomeEditor().apply(model, tokenizer, [EN], hp)

    (delta,) = edit.deltas
    assert delta.parameter == f"{hp.module_name}.weight" and delta.rank == 1
    assert torch.linalg.matrix_rank(delta.dense()).item() == 1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {delta.parameter}
    change = model.get_parameter(delta.parameter).detach() - before[delta.parameter]
    assert torch.allclose(change, delta.dense(), atol=1e-6 * delta.dense().abs().max().item() + 1e-7)


def test_sequential_requests_restore_bit_exactly(tiny_llama_dir):
    """(b) Two requests, each on the model as edited so far: two rank-one deltas of one weight, in the order they
    were added (which adds them back bit-exactly); one restore undoes both."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    original = parameter_hashes(model)

    edit = RomeEditor().apply(model, tokenizer, [EN, ZH], hparams("llama"))

    assert parameter_hashes(model) != original
    assert [r["target_new"] for r in edit.info["requests"]] == ["Rome", "巴黎"]
    assert [d.rank for d in edit.deltas] == [1, 1] and len({d.parameter for d in edit.deltas}) == 1
    edit.restore()
    assert parameter_hashes(model) == original


def test_chinese_request_on_byte_level_tokenizer(tiny_qwen2_dir):
    """(g) A Chinese prompt: the subject ends mid-prompt on a byte boundary and the target NLL still falls."""
    model, tokenizer = load_tiny(tiny_qwen2_dir)
    original = parameter_hashes(model)
    nll_before = target_nll(model, tokenizer, ZH)

    edit = RomeEditor().apply(model, tokenizer, [ZH], hparams("qwen2"))

    assert target_nll(model, tokenizer, ZH) < nll_before
    assert edit.info["requests"][0]["nll"] < nll_before
    edit.restore()
    assert parameter_hashes(model) == original


def test_early_stop_before_the_first_update(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    edit = RomeEditor().apply(model, tokenizer, [EN], hparams("llama", early_stop_loss=100.0, early_stop_plain=False))
    assert edit.info["requests"][0]["steps"] == 0


def test_early_stop_waits_for_the_plain_prompt(tiny_llama_dir):
    """With ``early_stop_plain`` a low mean NLL is not enough: the plain prompt must predict every target token.

    A random model never gets the later target tokens right, so the optimisation runs all its steps.
    """
    model, tokenizer = load_tiny(tiny_llama_dir)
    hp = hparams("llama", early_stop_loss=100.0, v_num_grad_steps=3)
    (record,) = RomeEditor().apply(model, tokenizer, [EN], hp).info["requests"]
    assert not record["plain_right"] and record["steps"] == 3
    assert converged(0.01, 9.0, True, hp) and not converged(0.01, 0.0, False, hp)
    assert not converged(200.0, 0.0, True, hp)
    easyedit = hparams("llama", early_stop_on="loss", early_stop_plain=False)  # the whole loss, plain prompt or not
    assert converged(9.0, 0.01, False, easyedit) and not converged(0.01, 0.2, True, easyedit)


# ---------------------------------------------------------------- the KV-cached value optimisation


def value_setup(path, arch: str, request: EditRequest):
    model, tokenizer = load_tiny(path)
    hp = hparams(arch)
    module = model.get_submodule(hp.module_name)
    templates = context_templates(
        model, tokenizer, hp.context_template_lengths, hp.context_templates_per_length, hp.template_seed
    )
    batch = build_value_batch(tokenizer, request, templates, hp.fact_token, "cpu")
    return model, tokenizer, module, templates, batch, hp


@pytest.mark.parametrize("request_", [EN, ZH], ids=["en", "zh"])
def test_cached_forward_equals_the_full_forward(arch_dir, request_):
    """Prefixes from the reference pass's KV cache + suffixes per step = the full forward, at delta = 0 and not."""
    arch, path = arch_dir
    model, tokenizer, module, templates, batch, hp = value_setup(path, arch, request_)
    reference = reference_pass(model, module, batch, tokenizer.pad_token_id)
    full = full_forward(model, module, batch, tokenizer.pad_token_id)
    cached = cached_forward(model, module, batch, tokenizer.pad_token_id, reference.prefix)
    assert reference.prefix is not None and len(set(batch.positions)) > 1  # prefixes of different lengths
    delta = torch.randn(reference.values.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reference.log_probs, full(None), atol=1e-6)
        assert torch.allclose(cached(None), full(None), atol=1e-5)
        assert torch.allclose(cached(delta), full(delta), atol=1e-5)
        assert not torch.allclose(full(delta), full(None), atol=1e-3)  # the delta does move the log-probs
    # the reference pass also yields the key: compute_k's average over the templates
    k = compute_k(model, tokenizer, module, request_, templates, hp.fact_token)
    assert torch.allclose(reference.keys[:-1].mean(0), k, atol=1e-6)


def test_cached_forward_with_empty_prefixes(tiny_llama_dir):
    """Rows whose fact token is their first token (no prefix), alone or beside rows with one."""
    model, _ = load_tiny(tiny_llama_dir)
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    rows = [[0, 40, 41, 42, 43], [0, 50, 51], [0, 60, 61, 62, 63, 64, 65]]
    delta = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for positions in ([0, 1, 3], [0, 0, 0]):
        read_rows = [0, 0, 1, 2, 2]
        batch = ValueBatch(
            rows=rows,
            positions=positions,
            read_rows=torch.tensor(read_rows),
            read_cols=torch.tensor([3, 4, 2, 5, 6]),
            t_ids=torch.tensor([7, 8, 9, 10]),
            t_weight=torch.full((4,), 0.25),
        )
        reference = reference_pass(model, module, batch, pad_id=2)
        assert (reference.prefix is None) == (max(positions) == 0)
        cached = cached_forward(model, module, batch, 2, reference.prefix)
        full = full_forward(model, module, batch, 2)
        with torch.no_grad():
            assert torch.allclose(cached(delta), full(delta), atol=1e-5)


def test_value_optimisation_falls_back_to_the_full_forward_when_the_cache_disagrees(
    tiny_llama_dir, monkeypatch, caplog
):
    """The run-time check at the first step: a disagreeing cached path is logged and replaced, never used."""
    model, tokenizer, module, templates, _, hp = value_setup(tiny_llama_dir, "llama", EN)
    # the first step's path (rewriting.value_forward) and the later steps' (compute_v's subsets)
    for where in (rewriting, value_step):
        monkeypatch.setattr(where, "cached_forward", lambda *args: full_forward(*args[:4]))
    expected = compute_v(model, tokenizer, module, EN, templates, hp)

    def broken(*args):
        run = full_forward(*args[:4])
        return lambda delta: run(delta) + 0.01  # e.g. a cache that lost a token

    for where in (rewriting, value_step):
        monkeypatch.setattr(where, "cached_forward", broken)
    with caplog.at_level("WARNING", logger="lm_eval.models.xke.editing"):
        solution = compute_v(model, tokenizer, module, EN, templates, hp)
    assert "disagrees with the full forward" in caplog.text
    assert torch.allclose(solution.v_star, expected.v_star, atol=1e-6) and solution.steps == expected.steps


def test_sliding_window_shorter_than_the_rows_uses_the_full_forward(tiny_qwen2_dir, caplog):
    """A sliding-window cache drops early tokens, so it cannot hold the prefixes: the edit still lands."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_qwen2_dir,
        dtype=torch.float32,
        use_sliding_window=True,
        sliding_window=8,
        layer_types=["sliding_attention"] * 4,
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    nll_before = target_nll(model, tokenizer, EN)
    with caplog.at_level("WARNING", logger="lm_eval.models.xke.editing"):
        RomeEditor().apply(model, tokenizer, [EN], hparams("qwen2"))
    assert "cannot be reused" in caplog.text
    assert target_nll(model, tokenizer, EN) < nll_before


# ---------------------------------------------------------------- hyper-parameters


def test_unknown_hyper_parameter_lists_the_valid_ones():
    """(e)"""
    with pytest.raises(EditorError) as err:
        RomeEditor().resolve_hparams("llama", overrides={"layers": 5})
    assert "layers" in str(err.value)
    for name in ("layer", "module_template", "v_lr", "mom2_adjustment"):
        assert name in str(err.value)


def test_family_defaults_and_string_overrides():
    gpt2 = RomeEditor().resolve_hparams("gpt2", overrides={"context_template_lengths": "5|10", "layer": "3"})
    assert gpt2.module_name == "transformer.h.3.mlp.c_proj"
    assert gpt2.context_template_lengths == [5, 10]
    assert RomeEditor().resolve_hparams("qwen2").module_name == "model.layers.5.mlp.down_proj"


def test_bad_settings_are_editor_errors(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    for overrides, message in [
        ({"layer": 99}, "not found"),
        ({"fact_token": "subject_first"}, "fact_token"),
        ({"mom2_adjustment": True, "mom2_corpus": "klingon"}, "mom2_corpus: unknown corpus source 'klingon'"),
    ]:
        with pytest.raises(EditorError, match=message):
            RomeEditor().apply(model, tokenizer, [EN], hparams("llama", **overrides))


# ---------------------------------------------------------------- covariance statistics


def test_covariance_adjustment_uses_the_key_statistics(tiny_llama_dir, tmp_path, monkeypatch):
    """(f) u = C^-1 k with C from a small corpus through the statistics engine (cached on disk, reused)."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    words = "the of and river city king war music science school language north village island".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[(i * j) % len(words)] for j in range(12)) for i in range(60)))
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path / "cache"))
    tallies = []
    real_tally = stats.tally
    monkeypatch.setattr(stats, "tally", lambda *a, **k: tallies.append(1) or real_tally(*a, **k))
    hp = hparams("llama", mom2_adjustment=True, mom2_corpus=str(corpus), mom2_n_tokens=2000)

    def edit_once():
        edit = RomeEditor().apply(model, tokenizer, [EN], hp)  # a fresh editor: no in-process cache
        edit.restore()
        return edit.deltas[0]

    first = edit_once()
    assert len(list((tmp_path / "cache" / "stats").rglob("*.pt"))) == 1
    second = edit_once()
    assert len(tallies) == 1  # read from disk
    assert torch.equal(first.a, second.a)

    plain = RomeEditor().apply(model, tokenizer, [EN], hparams("llama"))
    plain.restore()
    assert not torch.allclose(plain.deltas[0].a, first.a)  # C^-1 really changed the key direction u


# ---------------------------------------------------------------- the "none" editor


def test_none_editor_changes_nothing(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    original = parameter_hashes(model)
    editor = NoEditor()
    edit = editor.apply(model, tokenizer, [EN], editor.resolve_hparams("llama"))
    assert edit.deltas == () and edit.prompt_transform is None
    edit.restore()
    assert parameter_hashes(model) == original
