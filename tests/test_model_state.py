"""The model-state helpers every editor runs inside: eval mode and gradient flags come back exactly as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lm_eval_xke.editing.model_state import evaluating, frozen_parameters


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
