"""Batched value optimisation and ``edit_parallel``: several independent edits share each forward/backward pass,
and every edit's result equals optimising it alone."""

from __future__ import annotations

import pytest
import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import EditorError
from lm_eval_xke.plugins.memit import MemitEditor
from lm_eval_xke.plugins.rome import RomeEditor
from lm_eval_xke.plugins.rome.compute_v import compute_v, compute_values
from lm_eval_xke.testing import capital_city_case, loglikelihood_requests, parameter_hashes

# few templates, no decay and a loose clamp (a random model's values are tiny); an early stop that some requests
# reach within the steps and others do not, so that the batch shrinks while the others go on
TINY = {
    "layer": 1,
    "context_template_lengths": [5],
    "context_templates_per_length": 3,
    "clamp_norm_factor": 100.0,
    "v_weight_decay": 0.0,
    "v_num_grad_steps": 12,
    "early_stop_plain": False,
}
# prompts, subjects and targets of different token lengths: rows of different lengths and fact positions
REQUESTS = [
    EditRequest("The capital city of Ruritania", "Ruritania", "Berlin", "en"),
    EditRequest("Where was Ada born? In", "Ada", "the Kingdom of Freedonia", "en"),
    EditRequest("法国的首都是", "法国", "巴黎", "zh"),
    EditRequest("The mother tongue of Jean", "Jean", "Ex", "en"),
    EditRequest("Elbonia's king speaks", "Elbonia", "French and German", "en"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def setup(tiny, early_stop_loss: float, **overrides):
    model, tokenizer = tiny
    editor = RomeEditor()
    hp = editor.resolve_hparams("llama", overrides={**TINY, "early_stop_loss": early_stop_loss, **overrides})
    return model, tokenizer, model.get_submodule(hp.module_name), editor.context_templates(model, tokenizer, hp), hp


def early_stop_between(tiny) -> float:
    """An early-stop NLL that some requests reach within the steps and the others do not."""
    model, tokenizer, module, templates, hp = setup(tiny, early_stop_loss=0.0)
    final = sorted(compute_v(model, tokenizer, module, r, templates, hp).nll for r in REQUESTS)
    return (final[1] + final[2]) / 2


def assert_same(batched, alone) -> None:
    assert batched.steps == alone.steps
    assert batched.plain_right == alone.plain_right
    assert batched.nll == pytest.approx(alone.nll, rel=1e-3, abs=1e-4)
    scale = alone.v_star.norm().item()
    for field in ("v_star", "k", "k_plain", "out_plain"):
        assert torch.allclose(getattr(batched, field), getattr(alone, field), rtol=0, atol=1e-4 * scale), field


@pytest.mark.parametrize("v_batch_size", [5, 2])
def test_batched_values_equal_one_at_a_time(tiny, v_batch_size):
    """Each request's v*, steps and NLL match compute_v alone, while the others stop earlier or later."""
    model, tokenizer, module, templates, hp = setup(tiny, early_stop_between(tiny), v_batch_size=v_batch_size)
    alone = [compute_v(model, tokenizer, module, r, templates, hp) for r in REQUESTS]
    batched = compute_values(model, tokenizer, module, REQUESTS, templates, hp)
    steps = [s.steps for s in alone]
    assert min(steps) < hp.v_num_grad_steps == max(steps)  # some stopped early: their rows were frozen
    for b, a in zip(batched, alone, strict=True):
        assert_same(b, a)


def test_batched_values_on_the_full_forward_path(tiny):
    """Without the prefix cache (the reference toolkit's path) the batched results are the same."""
    model, tokenizer, module, templates, hp = setup(tiny, early_stop_between(tiny))
    cached = compute_values(model, tokenizer, module, REQUESTS, templates, hp)
    hp.v_prefix_cache = False
    full = compute_values(model, tokenizer, module, REQUESTS, templates, hp)
    for f, c in zip(full, cached, strict=True):
        assert_same(f, c)


def test_stopped_rows_do_not_move(tiny):
    """A request stopped at step 0 keeps delta = 0 although its batch neighbours take Adam steps."""
    model, tokenizer, module, templates, hp = setup(tiny, early_stop_between(tiny))
    stopped = setup(tiny, early_stop_loss=1e6)[-1]  # every request stops before its first step
    assert all(s.delta_norm == 0.0 for s in compute_values(model, tokenizer, module, REQUESTS, templates, stopped))
    assert any(s.delta_norm > 0 for s in compute_values(model, tokenizer, module, REQUESTS, templates, hp))


@pytest.mark.parametrize("editor_cls", [RomeEditor, MemitEditor])
def test_plans_apply_what_apply_would(tiny, editor_cls, tmp_path, monkeypatch):
    """Every case's plan applies the same weight change as ``apply`` on the unedited model, and restores exactly."""
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the river {i} runs north of the old city" for i in range(60)))
    model, tokenizer = tiny
    editor = editor_cls()
    settings = {**TINY, "layers": [1, 2], "mom2_n_tokens": 500, "mom2_corpus": str(corpus)}
    del settings["layer"]
    hp = editor.resolve_hparams("llama", overrides=TINY if editor_cls is RomeEditor else settings)
    cases = [[REQUESTS[0]], [REQUESTS[1], REQUESTS[2]], [REQUESTS[3]]]  # a case of two requests, too
    original = parameter_hashes(model)
    plans = editor.plan_parallel(model, tokenizer, cases, hp)
    assert parameter_hashes(model) == original  # planning changes nothing
    for case, plan in zip(cases, plans, strict=True):
        expected = editor.apply(model, tokenizer, case, hp)
        want = {d.parameter: d.dense() for d in expected.deltas}
        expected.restore()
        edit = plan()
        got = {d.parameter: d.dense() for d in edit.deltas}
        assert got.keys() == want.keys()
        for name, dense in want.items():
            assert torch.allclose(got[name], dense, rtol=0, atol=1e-4 * dense.abs().max().item())
        assert len(edit.info["requests"]) == len(case)
        edit.restore()
        assert parameter_hashes(model) == original


def test_editors_without_planning_are_refused(tiny_llama_dir):
    from lm_eval_xke.model import XKELM

    with pytest.raises(EditorError, match="cannot plan edits in parallel.*rome"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="grace", edit_parallel=4)
    with pytest.raises(EditorError, match="edit_mode=single"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="rome", edit_mode="sequential", edit_parallel=4)
    with pytest.raises(EditorError, match="edit_parallel"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="rome", edit_parallel=0)


def xke_requests(subjects_targets) -> list:
    docs = [capital_city_case(subject, target) for subject, target in subjects_targets]
    return [r for doc_id, doc in enumerate(docs) for r in loglikelihood_requests(doc, doc_id)]


def test_xke_edit_parallel_answers_as_one_at_a_time(tiny_llama_dir):
    """edit_parallel=3 over 4 cases (a group of 3, then 1): the same answers as edit_parallel=1, weights restored,
    one edit time per case."""
    from lm_eval_xke.model import XKELM

    settings = {k: v for k, v in TINY.items() if k != "early_stop_plain"}
    requests = xke_requests([("Ruritania", "Berlin"), ("Freedonia", "Tokyo"), ("Elbonia", "Paris"), ("Oz", "Rome")])
    answers = {}
    for parallel in (1, 3):
        lm = XKELM(
            pretrained=str(tiny_llama_dir),
            device="cpu",
            editor="rome",
            edit_parallel=parallel,
            journal="off",
            **settings,
        )
        before = parameter_hashes(lm.backend.model)
        answers[parallel] = lm.loglikelihood(requests)
        assert parameter_hashes(lm.backend.model) == before
        info = lm.get_model_info()["xke"]
        assert info["edit_parallel"] == parallel and info["n_editor_calls"] == 4
    for one, many in zip(answers[1], answers[3], strict=True):
        assert one[0] == pytest.approx(many[0], abs=1e-4) and one[1:] == many[1:]


def test_batched_values_equal_one_at_a_time_on_smollm2(smollm2_dir):
    """Two real Bi-ZsRE-like edits on SmolLM2-135M: batched and alone agree (few steps, to stay under a minute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    editor = RomeEditor()
    hp = editor.resolve_hparams("llama", overrides={"v_num_grad_steps": 4, "context_templates_per_length": 2})
    module = model.get_submodule(hp.module_name)
    templates = editor.context_templates(model, tokenizer, hp)
    requests = [
        EditRequest("Which company built the Volvo B12M?", "Volvo B12M", "Volkswagen Group", "en"),
        EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "en"),
    ]
    alone = [compute_v(model, tokenizer, module, r, templates, hp) for r in requests]
    for b, a in zip(compute_values(model, tokenizer, module, requests, templates, hp), alone, strict=True):
        assert_same(b, a)
