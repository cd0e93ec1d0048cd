"""SERAC on tiny random models: the pooled embedding, the scope routing, the memory's restore, and the real CLI.

A random model's classifier decides little, so routing is checked where it is certain: a question identical to an
edit's prompt has cosine 1 (logit ``scale + bias``, p ~0.99 for a classifier trained a few steps), and the threshold
is set just below that, so only such questions are in scope.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hidden_states import decoder_blocks, mean_pooled
from lm_eval_xke.editors import EditorError
from lm_eval_xke.plugins.serac import ScopeClassifier, SeracEditor, SeracTrainHyperParams
from lm_eval_xke.testing import load_tiny, parameter_hashes, train_tiny_editor
from lm_eval_xke.training import TrainRecord, load_artefact

REQUESTS = [
    EditRequest("The capital of France is", "France", "Rome", "en"),
    EditRequest("法国的首都是", "法国", "巴黎", "zh"),
]
FAR = "Die Katze schläft auf dem Sofa, und draußen regnet es seit Tagen ohne Pause."
CERTAIN = 0.98  # below p(cos = 1) of the trained tiny classifier, above every other pair's

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir) -> Path:
    options = ["--steps", "4", "--batch-size", "8", "--val-size", "8"]
    return train_tiny_editor(tmp_path_factory.mktemp("serac"), tiny_llama_dir, "serac", 40, *options)


def hparams(trained: Path, **overrides):
    values = {"editor_checkpoint": str(trained), "scope_threshold": CERTAIN, **overrides}
    return SeracEditor().resolve_hparams("llama", overrides=values)


def counterfactual(request: EditRequest, question: str) -> str:
    return f"New Fact: {request.prompt} {request.target_new}\nPrompt: {question}"


def test_mean_pooled_is_the_blocks_output_averaged_over_real_tokens(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    texts = ["short", "a much longer text than the first"]
    pooled = mean_pooled(model, tokenizer, decoder_blocks(model)[1], texts)
    for row, text in enumerate(texts):
        with torch.no_grad():
            hidden = model(torch.tensor([tokenizer(text)["input_ids"]]), output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(pooled[row], hidden[0].mean(0), rtol=1e-4, atol=1e-5)


def test_training_separates_paraphrases_from_unrelated_questions(tiny_llama_dir):
    """A few steps on records whose paraphrase repeats the question: the contrastive loss falls."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    model.requires_grad_(False)
    torch.manual_seed(0)
    classifier = ScopeClassifier(model, tokenizer, SeracTrainHyperParams(proj_dim=32)).train()
    records = [TrainRecord(f"Who made item {i}?", f"Who made item {i}?", "x", FAR[i:], "y", "en", i) for i in range(8)]
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = classifier.loss(records)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2
    scores = classifier.eval().validate(records)
    assert scores["val_rephrase"] == 1.0


def test_in_scope_questions_get_the_counterfactual_prompt_others_pass(trained, tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    before = parameter_hashes(model)
    edit = SeracEditor().apply(model, tokenizer, REQUESTS, hparams(trained))
    for request in REQUESTS:  # a batch: both facts are in memory
        assert edit.prompt_transform(request.prompt) == counterfactual(request, request.prompt)
    assert edit.prompt_transform(FAR) == FAR
    assert edit.info["memory_size"] == 2 and not edit.deltas
    edit.restore()
    assert parameter_hashes(model) == before


def test_sequential_memory_is_undone_newest_first(trained, tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    editor = SeracEditor()
    first = editor.apply(model, tokenizer, REQUESTS[:1], hparams(trained))
    second = editor.apply(model, tokenizer, REQUESTS[1:], hparams(trained))
    question = REQUESTS[0].prompt
    assert first.prompt_transform(question) == question  # the newer edit retrieves over both
    assert second.prompt_transform(question) == counterfactual(REQUESTS[0], question)
    second.restore()
    assert first.prompt_transform(question) == counterfactual(REQUESTS[0], question)
    assert first.prompt_transform(REQUESTS[1].prompt) == REQUESTS[1].prompt  # the second fact is forgotten
    first.restore()
    assert editor._memory.of(model) == []
    # a transform keeps the memory it was applied with (the deferred vLLM path asks after restore)
    assert second.prompt_transform(question) == counterfactual(REQUESTS[0], question)


def test_settings_are_checked(trained, tiny_llama_dir, tmp_path):
    model, tokenizer = load_tiny(tiny_llama_dir)
    editor = SeracEditor()
    with pytest.raises(EditorError, match="set editor_checkpoint=DIR"):
        editor.apply(model, tokenizer, REQUESTS, editor.resolve_hparams("llama"))
    with pytest.raises(EditorError, match=r"may only use \{prompt\} and \{target\}"):
        editor.apply(model, tokenizer, REQUESTS, hparams(trained, counterfactual_template="{question}"))
    with pytest.raises(EditorError, match="scope_threshold must be in"):
        editor.apply(model, tokenizer, REQUESTS, hparams(trained, scope_threshold=1.5))
    with pytest.raises(EditorError, match="holds a 'serac' editor, not 'mend'"):
        load_artefact(trained, model, "mend")


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_edits_through_the_lm_eval_cli(trained, tiny_llama_dir, data_dir, tmp_path, mode):
    env = {**os.environ, "XKE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    model_args = f"pretrained={tiny_llama_dir},editor=serac,editor_checkpoint={trained},edit_mode={mode}"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--tasks", "bizsre_en", "--model", "xke",
         "--model_args", model_args, "--limit", "2", "--output_path", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert results["config"]["xke"]["editor"] == "serac" and results["config"]["xke"]["n_edit_cases"] == 2
    assert "reliability_en_f1,none" in results["results"]["bizsre_en"]
