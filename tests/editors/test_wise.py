"""WISE on tiny random models: the side memory answers the edits, the router keeps other prompts on the main
memory, shards merge, and every restore gives back exactly the state before it.

A random tiny model's FFN activations are small (norm ~0.1 per token), so the routing margins and the learning
rate are scaled to them; the tests check the next-token prediction after each edit prompt (the target's first
token, a byte-level space), the routing and the restore paths.
"""

from __future__ import annotations

import pytest
import torch
from test_grace import REQUESTS, edit_prompt_first_tokens, first_token, identical, logits, run_bizsre, state

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import EditorError
from lm_eval_xke.plugins.wise import WiseEditor, WiseHyperParams
from lm_eval_xke.plugins.wise.compute import sparsify, ties_merge
from lm_eval_xke.plugins.wise.memory import has_memory
from lm_eval_xke.stats import pad_right
from lm_eval_xke.testing import load_tiny

TINY = {
    "layer": 2,
    "context_template_lengths": [5],
    "context_templates_per_length": 2,
    "alpha": 0.1,
    "beta": 0.5,
    "gamma": 0.3,
    "edit_lr": 50.0,
    "n_iter": 40,
    # a random model's activations differ little between prompts: a larger trainable share of its small
    # side memory (64 x 128) separates the edit prompts' scores from the others' more clearly
    "mask_ratio": 0.5,
}
FAR = ["Water is made of hydrogen and oxygen", "Die Katze schläft"]

pytestmark = pytest.mark.usefixtures("one_thread")


def hparams(model_type: str = "llama", **overrides) -> WiseHyperParams:
    return WiseEditor().resolve_hparams(model_type, overrides={**TINY, **overrides})


def assert_original(model, module, original: dict[str, torch.Tensor]) -> None:
    assert set(model.state_dict()) == set(original)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert not module._forward_hooks and not model._forward_pre_hooks and not has_memory(module)


def lands(model, tokenizer, request: EditRequest) -> bool:
    predicted, target = first_token(model, tokenizer, request)
    return predicted == target


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_lands_and_unrelated_prompts_stay_on_the_main_memory(arch, request, caplog):
    model, tokenizer = load_tiny(request.getfixturevalue(f"tiny_{arch}_dir"))
    hp = hparams(arch)
    assert not lands(model, tokenizer, REQUESTS[0])
    # the irrelevant prompts are trained below the threshold; prompts never seen in training are checked on the
    # tiny LLaMA only (the tiny GPT-2's FFN activations barely differ between prompts)
    unrelated = [*hp.irrelevant_prompts, *(FAR if arch == "llama" else [])]
    before = logits(model, tokenizer, unrelated)

    with caplog.at_level("WARNING", logger="lm_eval.models.xke.wise"):
        edit = WiseEditor().apply(model, tokenizer, [REQUESTS[0]], hp)

    assert "full forward" not in caplog.text  # the blocks before the side memory were replayed, not recomputed
    assert lands(model, tokenizer, REQUESTS[0])
    assert identical(logits(model, tokenizer, unrelated), before)  # routed to the main memory: the same logits
    info = edit.info
    assert info["plain_right"] and info["edit_scores"][0] > info["threshold"] > info["irrelevant_score"]
    edit.restore()


@pytest.mark.parametrize("save_freq", [1, 10], ids=["shard-per-edit-merge-every-2", "one-shard"])
def test_sequential_edits_merge_and_restore_newest_first_bit_exactly(tiny_llama_dir, save_freq):
    """Restoring the newest edit gives back exactly the state before it: after a shard change and a merge
    (one edit per shard, a merge every two edits) and inside one shard trained in place (its masked entries)."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    hp = hparams(save_freq=save_freq, merge_freq=2 * save_freq)
    module = model.get_submodule(hp.module_name)
    original, far = state(model), logits(model, tokenizer, FAR)
    prompts = [r.prompt for r in REQUESTS]
    editor = WiseEditor()
    edits, after = [], []
    for request in REQUESTS:
        edits.append(editor.apply(model, tokenizer, [request], hp))
        after.append(logits(model, tokenizer, prompts))
    assert [e.info["merged"] for e in edits] == ([False, True, False] if save_freq == 1 else [False] * 3)
    assert [e.info["edits_in_memory"] for e in edits] == [1, 2, 3]
    if save_freq == 1:  # a random model forgets an edit when a later one retrains its shard; merging keeps it
        assert all(lands(model, tokenizer, r) for r in REQUESTS)
    assert identical(logits(model, tokenizer, FAR), far)

    edits[2].restore()
    assert identical(logits(model, tokenizer, prompts), after[1])
    edits[1].restore()  # undoes the merge (one shard per edit) or the in-place training (one shard)
    assert identical(logits(model, tokenizer, prompts), after[0])
    newer = editor.apply(model, tokenizer, [REQUESTS[2]], hp)
    with pytest.raises(RuntimeError, match="newest first"):
        edits[0].restore()
    newer.restore()
    edits[0].restore()
    assert_original(model, module, original)


def test_routing_is_per_sequence_and_ignores_padding(tiny_llama_dir):
    """In a right-padded batch each row is routed on the mean score of its own real tokens."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    rows = [tokenizer(REQUESTS[0].prompt)["input_ids"], tokenizer(FAR[0] + " and more words here")["input_ids"]]
    input_ids, mask = pad_right(rows, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=mask).logits
    edit = WiseEditor().apply(model, tokenizer, [REQUESTS[0]], hparams())
    with torch.no_grad():
        after = model(input_ids=input_ids, attention_mask=mask).logits
    assert torch.equal(after[1], before[1])  # the unrelated row keeps the main memory
    assert after[0, len(rows[0]) - 1].argmax().item() == first_token(model, tokenizer, REQUESTS[0])[1]
    edit.restore()


def test_batch_of_requests_is_one_edit_and_restores_exactly(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    module = model.get_submodule(hparams().module_name)
    original = state(model)
    edit = WiseEditor().apply(model, tokenizer, REQUESTS, hparams())
    assert edit.info["targets"] == ["Rome", "Bob", "巴黎"] and edit.info["edits_in_memory"] == 1
    assert sum(lands(model, tokenizer, r) for r in REQUESTS) >= 2
    edit.restore()
    assert_original(model, module, original)


def test_failed_edit_leaves_nothing_behind(tiny_llama_dir, monkeypatch):
    model, tokenizer = load_tiny(tiny_llama_dir)
    module = model.get_submodule(hparams().module_name)
    original = state(model)

    def broken(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lm_eval_xke.plugins.wise.train_shard", broken)
    with pytest.raises(KeyboardInterrupt):
        WiseEditor().apply(model, tokenizer, REQUESTS[:1], hparams())
    assert_original(model, module, original)


def test_ties_merge_keeps_disjoint_changes_and_elects_signs():
    a = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 3.0, -3.0, 0.0]])
    # disjoint entries keep their full value; the conflicting one keeps the elected (larger weighted) sign
    assert torch.equal(ties_merge([a, b], [0.5, 0.5], density=1.0), torch.tensor([[2.0, 3.0, -3.0, 0.0]]))
    # the previous merged memory weighs more: agreeing entries are a weighted mean
    c = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(ties_merge([a, c], [0.4, 0.6], density=1.0)[0, 0], torch.tensor(3.2))
    assert torch.equal(sparsify(torch.tensor([1.0, -4.0, 2.0, 0.5]), 0.5), torch.tensor([0.0, -4.0, 2.0, 0.0]))


def test_cli_path_sequential_and_batch(tiny_llama_dir, data_dir, monkeypatch):
    """``lm_eval --model xke --model_args editor=wise,...`` in sequential mode (answers after each edit and after
    the last) and in batch mode: each edit prompt's next token is its target's first."""
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    # one shard per edit and a merge after the second, so that the final answers come from the merged memory
    # (a tiny random model forgets an earlier edit when the next one retrains its shard)
    for mode, expected in (("sequential", 4), ("batch", 2)):
        args = {"editor": "wise", **TINY, "save_freq": 1, "merge_freq": 2, "edit_mode": mode, "edit_batch_size": 2}
        out = run_bizsre(tiny_llama_dir, args)
        xke = out["config"]["xke"]
        assert xke["editor"] == "wise" and xke["edit_mode"] == mode and xke["n_edit_cases"] == 2
        assert edit_prompt_first_tokens(out) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layer": 99}, "not found.*set module_template and layer"),
        ({"mask_ratio": 0.0}, "mask_ratio must be in"),
        ({"save_freq": 2, "merge_freq": 3}, "merge_freq .3. must be a multiple of save_freq .2."),
        ({"alpha": 1.0, "beta": 0.5}, "alpha .* must be below beta"),
        ({"irrelevant_prompts": ""}, "irrelevant_prompts must hold at least one prompt"),
        ({"act_ratio": 1.5}, "act_ratio must be in"),
    ],
)
def test_bad_hyper_parameters_are_editor_errors(tiny_llama_dir, overrides, message):
    model, tokenizer = load_tiny(tiny_llama_dir)
    with pytest.raises(EditorError, match=message):
        WiseEditor().apply(model, tokenizer, REQUESTS[:1], hparams(**overrides))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unknown_hyper_parameter_and_family_defaults():
    with pytest.raises(EditorError, match="unknown hyper-parameter.*act_margin.*valid ones: layer"):
        WiseEditor().resolve_hparams("llama", overrides={"act_margin": "5|20|10"})
    hp = WiseEditor().resolve_hparams("qwen2", overrides={"irrelevant_prompts": "one|two"}, num_layers=24)
    assert hp.module_name == "model.layers.20.mlp.down_proj" and hp.irrelevant_prompts == ["one", "two"]
    assert WiseEditor().resolve_hparams("gpt2", num_layers=12).module_name == "transformer.h.10.mlp.c_proj"
    assert WiseEditor.supports_batch
