"""vLLM answers equal the HF backend's for the same ROME edits, on every route: LoRA, in place, mirrored."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance
from vllm_cases import FACTS, GREEDY, TINY_ROME, answer, assert_same_answers, edited_first_token, requests

PROTOCOLS = ("loglikelihood", "generate_until")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rome_answers_equal_hf(xke, request, arch, protocol):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    lm = xke(model_dir, **TINY_ROME)
    lora_before = lm.backend.answered["lora"]
    ours = answer(lm, protocol, requests(protocol))
    assert_same_answers(ours, answer(xke(model_dir, backend="hf", **TINY_ROME), protocol, requests(protocol)))
    assert lm.backend.answered["lora"] - lora_before == 12  # every post question through its edit's adapter
    if protocol == "loglikelihood":
        assert all(edited_first_token(ours[i]) for i in range(1, len(ours), 4))  # the edits landed
    settings = lm.get_model_info()["xke"]["backend_settings"]
    assert settings["engine_args"]["max_lora_rank"] == 1
    assert settings["engine_args"]["lora_target_modules"] == ["down_proj"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_lora_path_equals_in_place_path(xke, tiny_llama_dir, protocol):
    lora = xke(tiny_llama_dir, **TINY_ROME)
    in_place = xke(tiny_llama_dir, enable_lora=False, **TINY_ROME)
    before = in_place.backend.answered["in_place"]
    assert_same_answers(answer(in_place, protocol, requests(protocol)), answer(lora, protocol, requests(protocol)))
    assert in_place.backend.answered["in_place"] - before == 12


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_gpt2_without_vllm_lora_is_answered_in_place(xke, tiny_gpt2_dir, protocol):
    lm = xke(tiny_gpt2_dir, **TINY_ROME)
    ours = answer(lm, protocol, requests(protocol))
    assert_same_answers(ours, answer(xke(tiny_gpt2_dir, backend="hf", **TINY_ROME), protocol, requests(protocol)))
    assert lm.backend.answered["in_place"] >= 12 and not lm.backend.answered["lora"]
    assert not lm.get_model_info()["xke"]["backend_settings"]["engine_args"].get("enable_lora")


def test_sequential_edits_are_mirrored_in_place(xke, tiny_llama_dir):
    # real ROME: each edit is optimised on the model as edited so far
    lm = xke(tiny_llama_dir, editor="rome", edit_mode="sequential", **TINY_ROME)
    before = lm.backend.answered["live"]
    questions = requests("loglikelihood", sequential=True, facts=FACTS[:2])
    ours = lm.loglikelihood(questions)
    hf = xke(tiny_llama_dir, editor="rome", backend="hf", edit_mode="sequential", **TINY_ROME)
    assert_same_answers(ours, hf.loglikelihood(questions))
    assert lm.backend.answered["live"] - before == 6 + 6  # post questions after each edit, final ones at the end


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_held_edit_set_answers_ordinary_requests_in_vllm(xke, tiny_llama_dir, data_dir, protocol):
    """edit_set: ordinary lm-eval requests are answered by vLLM with the held edits mirrored into its weights, as
    the HF backend answers them on its edited weights (a vLLM engine of its own: max_num_seqs tells it apart)."""
    held = dict(editor="rome", edit_set="bizsre_en:2", xke_data_file=str(data_dir), **TINY_ROME)
    lm = xke(tiny_llama_dir, max_num_seqs=7, **held)
    plain = [
        Instance(protocol, {}, (f"The capital city of {subject}", f" {target}" if protocol == "loglikelihood"
                 else dict(GREEDY)), 0, ("plain", doc_id, 1))
        for doc_id, (subject, target) in enumerate(FACTS)
    ]  # fmt: skip
    before = lm.backend.answered["live"]
    ours = answer(lm, protocol, plain)
    assert lm.backend.answered["live"] - before == len(plain)
    reference = answer(xke(tiny_llama_dir, backend="hf", **held), protocol, plain)
    for mine, theirs in zip(ours, reference, strict=True):
        if protocol == "generate_until":
            assert mine == theirs
        else:  # lm-eval's own (loglikelihood, is_greedy), no read-out
            assert len(mine) == 2 and mine[1] == theirs[1] and mine[0] == pytest.approx(theirs[0], abs=1e-3)
