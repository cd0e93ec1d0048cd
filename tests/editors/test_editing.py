"""The shared editing helpers (``lm_eval_xke.editing``): the model-state guards every editor runs inside (eval mode
and gradient flags come back exactly as they were), and the hooks that read a module's input and output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lm_eval_xke.editing.hooks import module_io, trace_module
from lm_eval_xke.editing.model_state import evaluating, frozen_parameters
from lm_eval_xke.testing import load_tiny


def model() -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 1))
    net[2].weight.requires_grad_(False)  # a mixed set of flags, as a partly frozen model has
    return net


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_restores_the_models_own_mode_even_on_error(training):
    net = model().train(training)
    with pytest.raises(RuntimeError), evaluating(net):
        assert not net.training and not net[1].training
        raise RuntimeError("an editor failed")
    assert net.training is training and net[1].training is training


def test_frozen_parameters_restores_every_flag_even_on_error():
    net = model()
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    with pytest.raises(RuntimeError), frozen_parameters(net):
        assert not any(p.requires_grad for p in net.parameters())
        torch.zeros(1, requires_grad=True)  # the edit's own variables still train
        raise RuntimeError("an editor failed")
    assert {name: p.requires_grad for name, p in net.named_parameters()} == flags


def test_module_io_equals_the_full_pass_and_stops_after_the_module(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    module = model.model.layers[1].mlp.down_proj
    ids = torch.tensor([tokenizer("The capital city of France is")["input_ids"]])
    with trace_module(module) as full, torch.no_grad():
        model(input_ids=ids)
    ran = []
    later = model.model.layers[2].register_forward_hook(lambda *_: ran.append(True))
    head = model.get_output_embeddings().register_forward_hook(lambda *_: ran.append(True))
    stopped = module_io(model, module, input_ids=ids)
    later.remove()
    head.remove()
    assert not ran  # neither the later blocks nor the vocabulary projection ran
    assert torch.equal(stopped["input"], full["input"]) and torch.equal(stopped["output"], full["output"])
    with pytest.raises(ValueError, match="did not run"):
        module_io(model, torch.nn.Linear(2, 2), input_ids=ids)
