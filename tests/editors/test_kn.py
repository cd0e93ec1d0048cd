"""KN (knowledge neurons) on tiny random models: attribution, selection, the value-slot update and its restore."""

from __future__ import annotations

import pytest
import torch
from lm_eval import simple_evaluate

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.templates import context_templates
from lm_eval_xke.editing.tokens import split_prompt_target
from lm_eval_xke.editors import EditorError
from lm_eval_xke.plugins.kn import KnEditor, KnHyperParams
from lm_eval_xke.plugins.kn.compute import (
    AttributionPrompt,
    Neuron,
    attribute,
    integrated_gradients,
    refine_neurons,
    value_slot,
)
from lm_eval_xke.testing import load_tiny, parameter_hashes

EN = EditRequest("The capital of France", "France", "Rome", "en")
ZH = EditRequest("法国的首都是", "法国", "巴黎", "zh")


pytestmark = pytest.mark.usefixtures("one_thread")


def hparams(model_type: str, **overrides) -> KnHyperParams:
    return KnEditor().resolve_hparams(model_type, overrides=overrides)


def modules_of(model, hp: KnHyperParams) -> dict[int, torch.nn.Module]:
    return {layer: model.get_submodule(hp.module_template.format(layer)) for layer in range(4)}


def first_token_logprob(model, tokenizer, request: EditRequest) -> tuple[float, bool]:
    """log P(first target token | prompt) and whether it is the argmax."""
    prompt_ids, target_ids = split_prompt_target(tokenizer, request.prompt, request.target_new)
    with torch.no_grad():
        log_probs = model(torch.tensor([prompt_ids])).logits[0, -1].log_softmax(-1)
    return log_probs[target_ids[0]].item(), log_probs.argmax().item() == target_ids[0]


# ---------------------------------------------------------------- knowledge attribution


def test_integrated_gradients_is_the_papers_riemann_sum():
    """F(x) = exp(w . x): Attr_i = a_i w_i / m * sum_{k=1..m} exp((k/m) w . a), and the attributions add up to
    F(a) - F(0) as m grows (completeness)."""
    gen = torch.Generator().manual_seed(0)
    w, a = torch.randn(6, generator=gen), torch.randn(6, generator=gen)

    def objective(rows):
        return torch.exp(rows @ w)

    for steps in (1, 4):
        scores, values = integrated_gradients(objective, a, steps)
        alphas = torch.arange(1, steps + 1) / steps
        expected = a * w / steps * torch.exp(alphas * (w @ a)).sum()
        assert torch.allclose(scores, expected, rtol=1e-5)
        assert torch.allclose(values, torch.exp(alphas * (w @ a)))
    scores, _ = integrated_gradients(objective, a, 2000)
    assert scores.sum().item() == pytest.approx((torch.exp(w @ a) - 1).item(), rel=2e-3)


def test_attribution_finds_a_constructed_knowledge_neuron(tiny_llama_dir):
    """A neuron whose value slot writes token X's output embedding gets by far the highest attribution for X."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    hp = hparams("llama")
    modules = modules_of(model, hp)
    prompt_ids = tokenizer(EN.prompt)["input_ids"]
    token = 77
    _, baseline = attribute(model, modules, AttributionPrompt.of(prompt_ids, [token]), steps=1)
    layer, activations = 2, baseline.activations[2]
    neuron = int(activations.abs().argmax())
    unembedding = model.get_output_embeddings().weight[token]
    with torch.no_grad():  # the slot's contribution a_i v_i becomes 40 unit vectors along X's output embedding
        value_slot(modules[layer], neuron).copy_(40 * unembedding / unembedding.norm() / activations[neuron])

    with torch.enable_grad():
        scores, baseline = attribute(model, modules, AttributionPrompt.of(prompt_ids, [token]), steps=20)

    assert baseline.predicted == token
    top = scores.flatten().topk(2)
    assert divmod(int(top.indices[0]), scores.shape[1]) == (layer, neuron)
    assert top.values[0] > 5 * top.values[1]


def test_cached_attribution_equals_the_full_forward(arch_dir):
    """Reusing the unedited prefix's KV cache gives the scores of running the whole sequence."""
    arch, path = arch_dir
    model, tokenizer = load_tiny(path)
    modules = modules_of(model, hparams(arch))
    for request in (EN, ZH):
        prompt = AttributionPrompt.of(*split_prompt_target(tokenizer, request.prompt, request.target_new))
        with torch.enable_grad():
            cached, _ = attribute(model, modules, prompt, steps=4, cached=True)
            full, _ = attribute(model, modules, prompt, steps=4, cached=False)
        assert torch.allclose(cached, full, rtol=1e-4, atol=1e-7 * full.abs().max().item())
        assert full.abs().max() > 0


def test_refinement_keeps_neurons_shared_by_more_than_p_of_the_prompts():
    a, b, c = Neuron(0, 1, 0.5), Neuron(1, 2, 0.9), Neuron(3, 0, 0.2)
    per_prompt = [[a, b], [a, c], [a, b], [a]]
    assert refine_neurons(per_prompt, 0.5, 0) == [Neuron(0, 1, 2.0)]  # b is in 2 of 4 prompts: not > 0.5
    assert refine_neurons(per_prompt, 0.4, 0) == [Neuron(0, 1, 2.0), Neuron(1, 2, 1.8)]  # summed scores, sorted
    assert refine_neurons([[a, b, c]], 0.0, 2) == [b, a]  # one prompt keeps all, capped by score


# ---------------------------------------------------------------- the edit


@pytest.mark.parametrize("attribute_to", ["prediction", "target_new"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_raises_the_target_probability(arch, attribute_to, request):
    """The first target token gains; the old token is the model's own prediction."""
    model, tokenizer = load_tiny(request.getfixturevalue(f"tiny_{arch}_dir"))
    before, _ = first_token_logprob(model, tokenizer, EN)
    with torch.no_grad():
        predicted = int(model(torch.tensor([tokenizer(EN.prompt)["input_ids"]])).logits[0, -1].argmax())

    edit = KnEditor().apply(model, tokenizer, [EN], hparams(arch, attribute_to=attribute_to, lr_scale=4.0))

    after, _ = first_token_logprob(model, tokenizer, EN)
    assert after > before + 0.05
    (record,) = edit.info["requests"]
    assert record["neurons"] and record["old_token_id"] == predicted
    assert record["new_token"] == " " and record["target_tokens"] == 5


def test_value_slots_get_the_papers_update_and_restore_bit_exactly(arch_dir):
    """Only the selected neurons' slots change, each by s_i ||v_i|| (e_new - e_old) (unit output embeddings), as a
    WeightDelta of rank = touched slots in the weight's own layout; restore() puts every bit back."""
    arch, path = arch_dir
    model, tokenizer = load_tiny(path)
    hp = hparams(arch)
    modules = modules_of(model, hp)
    original = parameter_hashes(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    edit = KnEditor().apply(model, tokenizer, [ZH], hp)

    (record,) = edit.info["requests"]
    neurons = {(layer, index) for layer, index, _ in record["neurons"]}
    assert neurons and len(neurons) == sum(d.rank for d in edit.deltas)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {d.parameter for d in edit.deltas}
    embeddings = model.get_output_embeddings().weight.detach()
    old, new = embeddings[record["old_token_id"]], embeddings[record["new_token_id"]]
    direction = new / new.norm() - old / old.norm()
    for layer, module in modules.items():
        for index in range(module.weight.shape[0 if arch == "gpt2" else 1]):
            old_slot = before[f"{hp.module_template.format(layer)}.weight"]
            old_slot = old_slot[index] if arch == "gpt2" else old_slot[:, index]
            change = value_slot(module, index).detach() - old_slot
            if (layer, index) not in neurons:
                assert not change.any()
            else:
                expected = old_slot.norm() * direction
                assert torch.allclose(change, expected, atol=1e-6) or torch.allclose(change, -expected, atol=1e-6)
    edit.restore()
    assert parameter_hashes(model) == original


def test_batch_apply_adds_the_single_edits(tiny_llama_dir):
    """Both requests are attributed on the unedited model; one call applies the sum of their updates."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    hp = hparams("llama")
    editor = KnEditor()
    assert editor.supports_batch
    singles = []
    for request in (EN, ZH):
        edit = editor.apply(model, tokenizer, [request], hp)
        singles.append({d.parameter: d.dense() for d in edit.deltas})
        edit.restore()

    both = editor.apply(model, tokenizer, [EN, ZH], hp)

    assert [r["target_new"] for r in both.info["requests"]] == ["Rome", "巴黎"]
    for delta in both.deltas:
        expected = sum(single.get(delta.parameter, 0) for single in singles)
        assert torch.allclose(delta.dense(), expected, atol=1e-7)
        assert delta.rank == int((delta.dense().abs().sum(0) > 0).sum())  # one factor per touched slot


def test_refine_and_max_neurons(tiny_qwen2_dir):
    model, tokenizer = load_tiny(tiny_qwen2_dir)
    hp = hparams("qwen2", refine=True, refine_templates=2, refine_template_length=3, max_neurons=3, p=0.5)
    editor = KnEditor()
    edit = editor.apply(model, tokenizer, [EN], hp)
    (record,) = edit.info["requests"]
    assert len(record["n_coarse"]) == 3  # the bare prompt and two context-prefixed copies
    assert 0 < len(record["neurons"]) <= 3
    # the prefixes came from the shared per-model cache: asking again returns that same list
    settings = ([hp.refine_template_length], hp.refine_templates, hp.template_seed)
    assert len(context_templates(model, tokenizer, *settings)) == 3
    edit.restore()


# ---------------------------------------------------------------- hyper-parameters


def test_family_defaults_and_string_overrides():
    gpt2 = hparams("gpt2", layers="1|3", ig_steps="5")
    assert gpt2.module_template == "transformer.h.{}.mlp.c_proj"
    assert gpt2.layers == [1, 3] and gpt2.ig_steps == 5
    assert hparams("qwen2").module_template == "model.layers.{}.mlp.down_proj" and hparams("qwen2").layers == []
    with pytest.raises(EditorError, match="adaptive_threshold"):
        hparams("llama", thresold=0.3)


def test_bad_settings_are_editor_errors(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    for overrides, message in [
        ({"layers": [1, 9]}, r"layers \[9\] out of range"),
        ({"module_template": "model.layers.{}.mlp.out"}, "module_template"),
        ({"module_template": "model.layers.{}.mlp"}, "LlamaMLP"),
        ({"ig_steps": 0}, "ig_steps"),
        ({"adaptive_threshold": 1.0}, "adaptive_threshold"),
        ({"p": 1.0}, "p must be"),
        ({"max_neurons": -1}, "max_neurons"),
        ({"attribute_to": "gold"}, "prediction, target_new"),
        ({"refine": True, "refine_templates": 0}, "refine_templates"),
    ]:
        with pytest.raises(EditorError, match=message):
            KnEditor().apply(model, tokenizer, [EN], hparams("llama", **overrides))


# ---------------------------------------------------------------- the user's path


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_kn_through_simple_evaluate(tiny_llama_dir, data_dir, monkeypatch, xke_tasks, mode):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    out = simple_evaluate(
        task_manager=xke_tasks,
        model="xke",
        model_args=f"pretrained={tiny_llama_dir},device=cpu,editor=kn,ig_steps=4,edit_mode={mode},edit_batch_size=2",
        tasks=["bizsre_en"],
        limit=2,
    )
    config = out["config"]["xke"]
    assert config["editor"] == "kn" and config["hparams"]["ig_steps"] == 4
    assert config["n_edit_cases"] == 2 and config["edit_seconds_mean"] > 0
    assert 0.0 <= out["results"]["bizsre_en"]["reliability_en_em,none"] <= 1.0
