"""GRACE on tiny random models: the codebook answers its keys, leaves far inputs alone and restores exactly.

On a random model the value at the last prompt token steers the next-token prediction there (the target's first
token, a byte-level space); the tests check that token, the codebook's update rules and every restore path.
"""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval import simple_evaluate

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.tokens import split_prompt_target
from lm_eval_xke.editors import EditorError
from lm_eval_xke.plugins.grace import GraceEditor, GraceHyperParams
from lm_eval_xke.plugins.grace.codebook import codebook_on, has_codebook
from lm_eval_xke.testing import load_tiny

# A random tiny model's module inputs are small (norm ~0.1), so the radius is scaled down with them.
TINY = {"layer": 2, "eps": 0.01, "n_iter": 100}
REQUESTS = [
    EditRequest("The capital of France", "France", "Rome", "en"),
    EditRequest("Who wrote Hamlet", "Hamlet", "Bob", "en"),
    EditRequest("法国的首都是", "法国", "巴黎", "zh"),
]
FAR = ["Water is made of hydrogen and oxygen", "Die Katze schläft"]


pytestmark = pytest.mark.usefixtures("one_thread")


def hparams(model_type: str = "llama", **overrides) -> GraceHyperParams:
    return GraceEditor().resolve_hparams(model_type, overrides={**TINY, **overrides})


def first_token(model, tokenizer, request: EditRequest) -> tuple[int, int]:
    """The next-token argmax after the prompt, and the target's first token."""
    prompt_ids, target_ids = split_prompt_target(tokenizer, request.prompt, request.target_new)
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0, -1].argmax().item(), target_ids[0]


def logits(model, tokenizer, texts) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(t)["input_ids"]])).logits for t in texts]


def identical(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_original(model, module, original: dict[str, torch.Tensor]) -> None:
    assert set(model.state_dict()) == set(original)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert not module._forward_hooks and not has_codebook(module)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_lands_and_far_inputs_pass_through(arch, request, caplog):
    """The edit prompt's next token becomes the target's first; prompts far from the key give identical logits."""
    model, tokenizer = load_tiny(request.getfixturevalue(f"tiny_{arch}_dir"))
    predicted, target = first_token(model, tokenizer, REQUESTS[0])
    assert predicted != target
    far = logits(model, tokenizer, FAR)

    with caplog.at_level("WARNING", logger="lm_eval.models.xke"):
        edit = GraceEditor().apply(model, tokenizer, [REQUESTS[0]], hparams(arch))

    assert "full forward" not in caplog.text  # the value trained on ROME's KV-cached path
    assert first_token(model, tokenizer, REQUESTS[0]) == (target, target)
    assert identical(logits(model, tokenizer, FAR), far)
    (record,) = edit.info["requests"]
    assert record["codebook"] == "added" and record["first_token_right"] and edit.info["codebook_size"] == 1
    edit.restore()


def test_sequential_edits_accumulate_and_restore_newest_first_bit_exactly(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    module = model.get_submodule(hparams().module_name)
    original, far = state(model), logits(model, tokenizer, FAR)
    editor = GraceEditor()
    edits, after = [], []
    for request in REQUESTS:
        edits.append(editor.apply(model, tokenizer, [request], hparams()))
        after.append(logits(model, tokenizer, [r.prompt for r in REQUESTS]))
    assert len(codebook_on(module).entries) == 3
    assert all(first_token(model, tokenizer, r)[0] == first_token(model, tokenizer, r)[1] for r in REQUESTS)
    assert identical(logits(model, tokenizer, FAR), far)

    edits[2].restore()  # the model is exactly as after the first two edits
    assert identical(logits(model, tokenizer, [r.prompt for r in REQUESTS]), after[1])
    edits[1].restore()
    edits[0].restore()
    assert_original(model, module, original)
    edits[0].restore()  # a second restore is a no-op


def test_single_mode_restore_and_batch_of_requests(tiny_llama_dir):
    """One call with several requests writes one key each and one restore removes them all."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    module = model.get_submodule(hparams().module_name)
    original, before = state(model), logits(model, tokenizer, [r.prompt for r in REQUESTS])
    edit = GraceEditor().apply(model, tokenizer, REQUESTS, hparams())
    assert [r["target_new"] for r in edit.info["requests"]] == ["Rome", "Bob", "巴黎"]
    assert edit.info["codebook_size"] == 3
    edit.restore()
    assert_original(model, module, original)
    assert identical(logits(model, tokenizer, [r.prompt for r in REQUESTS]), before)


def test_codebook_adds_expands_splits_and_undoes_each_change():
    """The paper's update: far -> new key; near with the same label -> wider radius; other label -> split."""
    module = torch.nn.Linear(2, 3)
    codebook = codebook_on(module)
    token = object()
    codebook.begin(token)
    value = torch.zeros(3)
    first, case = codebook.write(torch.tensor([0.0, 0.0]), (1,), 1.0, value)
    assert case == "added"
    assert codebook.write(torch.tensor([5.0, 0.0]), (2,), 1.0, value)[1] == "added"  # 5 > 1 + 1
    assert codebook.write(torch.tensor([0.5, 0.0]), (1,), 1.0, value) == (first, "inside")
    assert codebook.write(torch.tensor([1.5, 0.0]), (1,), 1.0, value) == (first, "expanded")
    assert first.epsilon == pytest.approx(1.5)
    split, case = codebook.write(torch.tensor([0.0, 2.0]), (3,), 1.0, value)
    assert case == "split" and split.epsilon == pytest.approx(1.0) and first.epsilon == pytest.approx(1.0 - 1e-5)
    codebook.begin(later := object())
    codebook.set_value(first, torch.ones(3))
    with pytest.raises(RuntimeError, match="newest first"):
        codebook.rollback(token)
    codebook.rollback(later)
    assert torch.equal(first.value, value)
    codebook.rollback(token)
    assert not codebook.entries and not module._forward_hooks and not has_codebook(module)


def test_replacement_only_at_positions_within_the_radius():
    """Every position is looked up on its own: only the one that matches a key gets that key's value."""
    module = torch.nn.Linear(2, 3)
    codebook = codebook_on(module)
    codebook.begin(token := object())
    codebook.write(torch.tensor([1.0, 1.0]), (7,), 0.1, torch.full((3,), 9.0))
    inputs = torch.tensor([[[0.0, 0.0], [1.0, 1.05], [3.0, 1.0]]])
    with torch.no_grad():
        out = module(inputs)
        plain = torch.nn.functional.linear(inputs, module.weight, module.bias)
    assert torch.equal(out[0, 1], torch.full((3,), 9.0))
    assert torch.equal(out[0, 0], plain[0, 0]) and torch.equal(out[0, 2], plain[0, 2])
    codebook.rollback(token)


def test_failed_edit_leaves_nothing_behind(tiny_llama_dir, monkeypatch):
    model, tokenizer = load_tiny(tiny_llama_dir)
    module = model.get_submodule(hparams().module_name)
    original = state(model)

    def broken(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lm_eval_xke.plugins.grace.train_value", broken)
    with pytest.raises(KeyboardInterrupt):
        GraceEditor().apply(model, tokenizer, REQUESTS[:1], hparams())
    assert_original(model, module, original)


@pytest.mark.parametrize("mode", ["sequential", "batch"])
def test_cli_path_sequential_and_batch(tiny_llama_dir, data_dir, monkeypatch, mode):
    """``lm_eval --model xke --model_args editor=grace,...``: each edit prompt's next token is its target's first,
    right after the edit and (sequential) again after the last edit."""
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    out = run_bizsre(tiny_llama_dir, {"editor": "grace", **TINY, "edit_mode": mode, "edit_batch_size": 2})
    xke = out["config"]["xke"]
    assert xke["editor"] == "grace" and xke["edit_mode"] == mode and xke["n_edit_cases"] == 2
    assert edit_prompt_first_tokens(out) == (4 if mode == "sequential" else 2)


def run_bizsre(model_dir, model_args: dict, limit: int = 2) -> dict:
    """``simple_evaluate`` as the CLI calls it: the tasks see the model_args (sequential mode adds final questions)."""
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        task_manager=TaskManager(include_defaults=False, metadata=model_args),
        model="xke",
        model_args=",".join(
            f"{k}={model_arg(v)}" for k, v in {"pretrained": model_dir, "device": "cpu", **model_args}.items()
        ),
        tasks=["bizsre_en"],
        limit=limit,
        log_samples=True,
    )


def model_arg(value) -> str:
    """A hyper-parameter as the command line writes it (lists as ``a|b``)."""
    return "|".join(map(str, value)) if isinstance(value, list) else str(value)


def edit_prompt_first_tokens(out: dict) -> int:
    """How many read-outs of the edit prompts (edit-language reliability) there are; each must start right."""
    count = 0
    for sample in out["samples"]["bizsre_en"]:
        questions = sample["doc"]["xke"]["questions"]
        for question, response in zip(questions, sample["filtered_resps"], strict=True):
            if question["role"] == "reliability" and question["lang"] == "en":
                readout = json.loads(response[2])
                assert readout["answer_ids"][:1] == readout["target_ids"][:1], (question, readout)
                count += 1
    return count


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layer": 99}, "not found.*set module_template and layer"),
        ({"module_template": "model.layers.{}.mlp"}, "wraps a linear module"),
        ({"val_init": "hot"}, "val_init must be one of cold, warm"),
        ({"eps": 0}, "eps .* must be > 0"),
        ({"n_iter": 0}, "n_iter must be >= 1"),
    ],
)
def test_bad_hyper_parameters_are_editor_errors(tiny_llama_dir, overrides, message):
    model, tokenizer = load_tiny(tiny_llama_dir)
    with pytest.raises(EditorError, match=message):
        GraceEditor().apply(model, tokenizer, REQUESTS[:1], hparams(**overrides))
    assert not any(m._forward_hooks for m in model.modules())


def test_unknown_hyper_parameter_and_family_defaults():
    with pytest.raises(EditorError, match="unknown hyper-parameter.*epsilon.*valid ones: layer"):
        GraceEditor().resolve_hparams("llama", overrides={"epsilon": 1})
    assert GraceEditor().resolve_hparams("llama", num_layers=30).module_name == "model.layers.25.mlp.down_proj"
    assert GraceEditor().resolve_hparams("gpt2", num_layers=12).module_name == "transformer.h.10.mlp.c_proj"
    assert GraceEditor.supports_batch
