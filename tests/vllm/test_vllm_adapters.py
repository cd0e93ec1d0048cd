"""Weight deltas as PEFT LoRA adapters: checked against PEFT's own merge, without a vLLM engine."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lm_eval_xke.backends.vllm_lora import adapter_rank, smallest_vllm_rank, write_adapter
from lm_eval_xke.editors import WeightDelta


def random_delta(parameter: str, model, rank: int, seed: int) -> WeightDelta:
    rows, cols = model.get_parameter(parameter).shape
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(rows, rank, generator=generator)
    return WeightDelta(parameter, b, torch.randn(rank, cols, generator=generator))


def test_adapter_adds_exactly_the_deltas(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    down, q = "model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    # two deltas of one weight stack to rank 2; q_proj's rank-1 delta is zero-padded to the adapter's rank 2
    deltas = [random_delta(down, model, 1, 0), random_delta(down, model, 1, 1), random_delta(q, model, 1, 2)]
    assert adapter_rank(deltas) == 2
    write_adapter(tmp_path, deltas)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2, 2, ["down_proj", "q_proj"])

    merged = PeftModel.from_pretrained(model, tmp_path).merge_and_unload()
    expected = dict(base)
    for delta in deltas:
        expected[delta.parameter] = expected[delta.parameter] + delta.dense()
    for name, param in merged.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank, allowed", [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320)])
def test_smallest_vllm_rank(rank, allowed):
    assert smallest_vllm_rank(rank) == allowed


def test_rank_beyond_vllm_is_an_error():
    with pytest.raises(ValueError, match="exceeds vLLM's largest max_lora_rank 512"):
        smallest_vllm_rank(513)
