"""The model's own state around an edit: eval mode and gradient flags, each restored exactly as it was.

Every editor that reads or trains on the model runs inside these, so that dropout never perturbs what is measured
and the model's train/eval mode and its parameters' ``requires_grad`` flags come back unchanged (part of the
restore contract).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout while keys and values are measured), the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Switch off gradients of every parameter (only the edit's own variables are optimised); restore the flags."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
