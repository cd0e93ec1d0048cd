"""Forward hooks on one module: record its input and output (``trace_module``; ``module_io`` stops the forward pass
there), or add a vector to its output at given positions."""

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


class _Reached(Exception):
    """Raised once the traced module has run: the rest of the forward pass is not needed."""


@torch.no_grad()
def module_io(model: torch.nn.Module, module: torch.nn.Module, **inputs) -> dict[str, torch.Tensor]:
    """The module's ``"input"`` and ``"output"`` in ``model(**inputs)``, the pass stopped right after the module.

    The later blocks and the vocabulary projection are never computed: for a batch of keys that is most of the time,
    and the logits alone (rows x tokens x vocabulary floats) take gigabytes for a hundred edits' templates on a
    150k-token vocabulary.
    """
    record: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        record["input"], record["output"] = args[0], output
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        model(**inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not record:
        raise ValueError(f"{type(module).__name__} did not run in the forward pass of {type(model).__name__}")
    return record


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
