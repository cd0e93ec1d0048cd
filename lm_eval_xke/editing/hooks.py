"""Forward hooks on one module: record its input and output, or add a vector to its output at given positions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def trace_module(module: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the module's input and output of the next forward passes under ``"input"`` / ``"output"``."""
    record: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        record["input"], record["output"] = args[0], output

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@contextlib.contextmanager
def add_to_output(module: torch.nn.Module, positions: Sequence[int], delta: torch.Tensor) -> Iterator[None]:
    """Add ``delta`` to the module's output at ``positions[row]`` of every batch row (``m_i := m_i + delta``)."""

    def hook(_module, _args, output):
        rows = torch.arange(len(positions), device=output.device)
        cols = torch.as_tensor(positions, device=output.device)
        edited = output.clone()  # out of place, so autograd reaches delta
        edited[rows, cols] = edited[rows, cols] + delta.to(output.dtype)
        return edited

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def device_of(model) -> torch.device:
    """The device of the model's (first) parameters, where its inputs go."""
    return next(model.parameters()).device
