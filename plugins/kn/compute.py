"""The math of knowledge neurons (Dai et al. 2022, arXiv 2104.08696), one small function per step of the paper.

An MLP is read as a key-value memory: its intermediate activations (the input of the output projection) are the
*neurons*, and the output projection's column for neuron ``i`` is its *value slot*, the vector it adds to the
residual stream. Knowledge attribution scores every neuron at the last prompt token by integrated gradients of the
answer's probability; the edit rewrites the value slots of the highest-scoring neurons so that they write the new
answer's output embedding instead of the old one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import DynamicCache

from lm_eval_xke.editing.hooks import device_of, trace_module
from lm_eval_xke.editing.rewriting import paths_agree, prefix_cache
from lm_eval_xke.editors import WeightDelta

log = logging.getLogger("lm_eval.models.xke.kn")


class Neuron(NamedTuple):
    layer: int
    index: int
    score: float  # attribution, relative to the unedited model's answer probability


@dataclass(frozen=True)
class AttributionPrompt:
    """A prompt and an answer, teacher-forced: ``ids = prompt + answer[:-1]``, neurons read at ``position``."""

    ids: list[int]
    position: int  # the last prompt token: its next-token distribution is the answer's first token
    answer: list[int]

    @classmethod
    def of(cls, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> AttributionPrompt:
        return cls(ids=[*prompt_ids, *answer_ids[:-1]], position=len(prompt_ids) - 1, answer=list(answer_ids))


@dataclass
class Baseline:
    """The unedited model on an attribution prompt."""

    activations: list[torch.Tensor]  # per searched layer: the neurons at the prompt's last token, [ffn]
    log_prob: torch.Tensor  # log P(answer | prompt), float32 scalar
    predicted: int  # the token the model predicts after the prompt (the old answer's first token)
    prefix: list[tuple] | None  # KV cache of the tokens before ``position``; None where it cannot be reused


# ---------------------------------------------------------------- the answer and the unedited model


@torch.no_grad()
def predicted_token(model, prompt_ids: Sequence[int]) -> int:
    """The token the model predicts after the prompt: the first token of the answer it gives now."""
    logits = model(input_ids=torch.tensor([list(prompt_ids)], device=device_of(model)), logits_to_keep=1).logits
    return int(logits[0, -1].argmax())


def answer_log_prob(logits: torch.Tensor, answer: Sequence[int]) -> torch.Tensor:
    """``log P(answer)`` per row from the logits at the answer's reading positions ``[rows, len(answer), vocab]``."""
    log_probs = logits.float().log_softmax(-1)
    ids = torch.tensor(answer, device=logits.device)
    return log_probs[:, torch.arange(len(answer), device=logits.device), ids].sum(-1)


@torch.no_grad()
def baseline_pass(model, modules: Sequence[torch.nn.Module], prompt: AttributionPrompt) -> Baseline:
    """One forward of the unedited model: the neurons of every searched layer, the answer's probability, the
    predicted token and the KV cache of the tokens before the last prompt token."""
    ids = torch.tensor([prompt.ids], device=device_of(model))
    with contextlib.ExitStack() as stack:
        records = [stack.enter_context(trace_module(m)) for m in modules]
        out = model(input_ids=ids, use_cache=prompt.position > 0)
    reads = out.logits[:, prompt.position :]
    return Baseline(
        activations=[r["input"][0, prompt.position].detach() for r in records],
        log_prob=answer_log_prob(reads, prompt.answer)[0],
        predicted=int(reads[0, 0].argmax()),
        prefix=prefix_cache(out.past_key_values, [prompt.position], len(prompt.ids)) if prompt.position else None,
    )


# ---------------------------------------------------------------- knowledge attribution


def scaled_activations(activation: torch.Tensor, steps: int) -> torch.Tensor:
    """``(k / m) * activation`` for ``k = 1..m``: the paper's Riemann points from the zero baseline, ``[m, ffn]``."""
    alphas = torch.arange(1, steps + 1, device=activation.device, dtype=torch.float32) / steps
    return (alphas[:, None] * activation.float()[None, :]).to(activation.dtype)


def integrated_gradients(
    objective: Callable[[torch.Tensor], torch.Tensor], activation: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Attr_i = a_i / m * sum_k dF((k/m) a) / da_i`` (the paper's Riemann approximation), and ``F`` per point.

    ``objective`` maps the ``[m, ffn]`` scaled activations to one value per row, the rows being independent, so
    one backward of their sum gives every row's gradient at once.
    """
    scaled = scaled_activations(activation, steps).requires_grad_(True)
    values = objective(scaled)
    (grad,) = torch.autograd.grad(values.sum(), scaled)
    return activation.float() * grad.float().sum(0) / steps, values.detach()


@contextlib.contextmanager
def replace_input(module: torch.nn.Module, column: int, rows: torch.Tensor) -> Iterator[None]:
    """Feed ``rows[r]`` to the module instead of its input at sequence ``column`` of batch row ``r``."""

    def hook(_module, args):
        edited = args[0].clone()  # out of place, so autograd reaches ``rows``
        edited[:, column] = rows.to(edited.dtype)
        return (edited, *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def expanded_cache(prefix: list[tuple], rows: int) -> DynamicCache:
    """A fresh cache holding ``prefix`` for every row: the forward appends to it, the prefix tensors (expanded
    views, no copies) are never written to."""
    return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), *rest) for k, v, *rest in prefix])


def answer_probability(
    model, module: torch.nn.Module, prompt: AttributionPrompt, baseline: Baseline, cached: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``F(rows) = P(answer) / P_unedited(answer)`` with the module's input at the last prompt token replaced by
    each row; the paper's probability, divided by a constant so that no multi-token answer underflows.

    ``cached``: run only the tokens from the last prompt token on, against the unedited model's KV cache of the
    ones before it (the replacement cannot change them); else the whole sequence.
    """
    start = prompt.position if cached else 0
    device = device_of(model)
    ids = torch.tensor([prompt.ids[start:]], device=device)
    position_ids = torch.arange(start, len(prompt.ids), device=device)[None]

    def run(rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        cache = expanded_cache(baseline.prefix, n) if cached else None
        with replace_input(module, prompt.position - start, rows):
            logits = model(
                input_ids=ids.expand(n, -1),
                position_ids=position_ids.expand(n, -1),
                past_key_values=cache,
                use_cache=cached,
                logits_to_keep=len(prompt.answer),
            ).logits
        return torch.exp(answer_log_prob(logits, prompt.answer).double() - baseline.log_prob.double())

    return run


def attribute(
    model, modules: Mapping[int, torch.nn.Module], prompt: AttributionPrompt, steps: int, cached: bool = True
) -> tuple[torch.Tensor, Baseline]:
    """Attribution scores ``[layers, ffn]`` (in ``modules``' order) of every neuron at the last prompt token.

    Each layer is one forward and backward of ``steps`` rows. The last row (``k = m``) is the unedited model, so
    it must give ``F = 1``: a KV-cached path that does not is logged and replaced by the full forward.
    """
    baseline = baseline_pass(model, list(modules.values()), prompt)
    cached = cached and baseline.prefix is not None
    if prompt.position > 0 and baseline.prefix is None:
        log.warning("KN: the KV cache of %s cannot be reused; using the full forward (slower)", model.config.model_type)
    scores = []
    for module, activation in zip(modules.values(), baseline.activations, strict=True):
        score, values = integrated_gradients(
            answer_probability(model, module, prompt, baseline, cached), activation, steps
        )
        if cached and not paths_agree(
            values[-1:].log().float(), torch.zeros(1, device=values.device), module.weight.dtype
        ):
            log.warning(
                "KN: the KV-cached attribution disagrees with the full forward on %s; using the full forward (slower)",
                model.config.model_type,
            )
            cached = False
            score, _ = integrated_gradients(
                answer_probability(model, module, prompt, baseline, False), activation, steps
            )
        scores.append(score)
    return torch.stack(scores), baseline


# ---------------------------------------------------------------- selection


def coarse_neurons(scores: torch.Tensor, layers: Sequence[int], adaptive_threshold: float) -> list[Neuron]:
    """Neurons scoring above ``adaptive_threshold`` times the largest score over all searched layers."""
    top = scores.max()
    if top <= 0:  # nothing raises the answer's probability: no knowledge neuron
        return []
    rows, cols = torch.nonzero(scores > adaptive_threshold * top, as_tuple=True)
    return [Neuron(layers[r], int(c), float(scores[r, c])) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]


def refine_neurons(per_prompt: Sequence[Sequence[Neuron]], p: float, max_neurons: int) -> list[Neuron]:
    """Neurons found for more than ``p`` of the prompts, the highest summed score first, at most ``max_neurons``.

    With one prompt this keeps all of its coarse neurons (``1 > p``).
    """
    counts: dict[tuple[int, int], int] = {}
    totals: dict[tuple[int, int], float] = {}
    for neurons in per_prompt:
        for n in neurons:
            key = (n.layer, n.index)
            counts[key] = counts.get(key, 0) + 1
            totals[key] = totals.get(key, 0.0) + n.score
    kept = [Neuron(*key, totals[key]) for key, count in counts.items() if count > p * len(per_prompt)]
    kept.sort(key=lambda n: n.score, reverse=True)
    return kept[:max_neurons] if max_neurons > 0 else kept


# ---------------------------------------------------------------- the update of the value slots


def value_slot(module: torch.nn.Module, index: int) -> torch.Tensor:
    """What neuron ``index`` writes per unit of activation: ``nn.Linear`` column, ``Conv1D`` ([in, out]) row."""
    weight = module.weight
    return weight[index] if type(module).__name__ == "Conv1D" else weight[:, index]


def unit_embedding(model, token: int) -> torch.Tensor:
    """The token's output embedding (the unembedding row the logits read), unit norm, float32."""
    row = model.get_output_embeddings().weight[token].detach().float()
    return row / row.norm()


def slot_updates(
    model,
    modules: Mapping[int, torch.nn.Module],
    neurons: Sequence[Neuron],
    signs: Mapping[tuple[int, int], float],
    old_token: int,
    new_token: int,
    erase_scale: float,
    lr_scale: float,
) -> dict[tuple[int, int], torch.Tensor]:
    """``dv_i = s_i ||v_i|| (lr_scale * e_new - erase_scale * e_old)`` per neuron, ``e`` unit output embeddings.

    The paper's update ``v_i - lambda1 t + lambda2 t'``, with the authors' code's scaling of each embedding to the
    slot's norm. ``s_i`` is the sign of the neuron's activation: the slot enters the output as ``a_i v_i``, and
    gated MLPs (SwiGLU) have negative activations too, whose slots must move the other way.
    """
    direction = lr_scale * unit_embedding(model, new_token) - erase_scale * unit_embedding(model, old_token)
    updates = {}
    for n in neurons:
        norm = value_slot(modules[n.layer], n.index).detach().float().norm()
        updates[(n.layer, n.index)] = signs[(n.layer, n.index)] * norm * direction.to(norm.device)
    return updates


def slot_deltas(
    modules: Mapping[int, torch.nn.Module], module_template: str, updates: Mapping[tuple[int, int], torch.Tensor]
) -> list[WeightDelta]:
    """One ``WeightDelta`` per touched layer, of rank = its number of touched slots, in the weight's own layout.

    ``nn.Linear`` ([out, in]): ``b`` holds the slot changes as columns, ``a`` one-hot rows picking the slots.
    ``Conv1D`` ([in, out]): ``b`` one-hot columns picking the slots, ``a`` the changes as rows.
    """
    deltas = []
    for layer in sorted({layer for layer, _ in updates}):
        module = modules[layer]
        indices = sorted(i for l_, i in updates if l_ == layer)
        changes = torch.stack([updates[(layer, i)] for i in indices])  # [k, d_model]
        width = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]
        picks = torch.zeros(len(indices), width, device=changes.device)
        picks[torch.arange(len(indices), device=changes.device), torch.tensor(indices, device=changes.device)] = 1.0
        name = f"{module_template.format(layer)}.weight"
        if type(module).__name__ == "Conv1D":
            deltas.append(WeightDelta(parameter=name, b=picks.T.contiguous(), a=changes))
        else:
            deltas.append(WeightDelta(parameter=name, b=changes.T.contiguous(), a=picks))
    return deltas
