"""The math of ROME (Meng et al. 2022, arXiv 2202.05262), one small function per step of the paper.

ROME treats an MLP output projection ``W`` as a key-value memory: the key ``k`` is the module's input at the
subject's last token and ``W k`` its value. An edit finds a value ``v*`` that makes the model state the new
target (``compute_v``) and writes it with the rank-one update ``dW = right ⊗ u`` so that ``W' k = v*``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import WeightDelta
from lm_eval_xke.stats import pad_right

from .config import RomeHyperParams

#: First words of the sampled context prefixes, as in the original ROME code.
START_WORDS = ("The", "Therefore", "Because", "I", "You")
#: The paper's "essence" prompt: the KL term keeps what the model says the subject *is*.
KL_PROMPT = "{} is a"


# ---------------------------------------------------------------- tokens and positions


def split_prompt_target(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``target`` as the teacher-forced evaluation feeds them.

    This is lm-eval's ``_encode_pair`` for context ``prompt`` and continuation ``" " + target`` (the tasks'
    ``target_delimiter``): the whole text is encoded in one go and split at the prompt's own token length, so
    the joining space belongs to the target (``" Paris"``); trailing spaces of the prompt move to the target.
    Encoding the target alone would glue it to the prompt or tokenize it differently, and the edit would
    learn ids the evaluation never asks for.
    """
    context = prompt.rstrip()
    prompt_ids = tokenizer(context)["input_ids"]
    target_ids = tokenizer(prompt + " " + target)["input_ids"][len(prompt_ids) :]
    if not target_ids:
        raise ValueError(f"target {target!r} adds no tokens to prompt {prompt!r}")
    return prompt_ids, target_ids


def fact_token_index(tokenizer, template: str, prompt: str, subject: str, fact_token: str) -> int:
    """Position of the edited key in ``template.format(prompt)`` (``template`` ends with ``"{}"``).

    ``subject_last``: tokenize the text up to the end of the subject's first occurrence in ``prompt`` (not in
    the context prefix, which may mention it too); the index is that length - 1. ``last``: the prompt's last token.
    """
    if fact_token == "last":
        return len(tokenizer(template.format(prompt))["input_ids"]) - 1
    end = prompt.index(subject) + len(subject)
    return len(tokenizer(template.format(prompt[:end]))["input_ids"]) - 1


# ---------------------------------------------------------------- hooks


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


@contextlib.contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """Switch off gradients of every parameter (only the value delta is optimised); restore the flags after."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# ---------------------------------------------------------------- context templates


def generate_context_templates(model, tokenizer, lengths: Sequence[int], per_length: int, seed: int) -> list[str]:
    """``["{}"]`` plus ``"<prefix>. {}"`` for prefixes sampled from the model itself (top-k 5).

    Averaging keys and losses over such prefixes makes the edit hold in contexts other than the bare prompt.
    Sampling uses a private generator seeded with ``seed``, so the templates are reproducible and the global
    RNG state of the caller is left untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    templates = ["{}"]
    for length in lengths:
        counts = [per_length // len(START_WORDS) + (i < per_length % len(START_WORDS)) for i in range(len(START_WORDS))]
        for word, count in zip(START_WORDS, counts, strict=True):
            if count:
                for text in sample_continuations(model, tokenizer, word, count, length, generator):
                    # braces would break str.format; newlines are kept as the model wrote them
                    templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


@torch.no_grad()
def sample_continuations(
    model, tokenizer, start: str, count: int, length: int, generator: torch.Generator, top_k: int = 5
) -> list[str]:
    """``count`` texts of ``start`` followed by ``length`` top-k sampled tokens (one unpadded batch, KV cache)."""
    ids = torch.tensor([tokenizer(start)["input_ids"]] * count, device=_device(model))
    sequence, past = ids, None
    for _ in range(length):
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        top = out.logits[:, -1].float().topk(top_k, dim=-1)
        # sample on CPU so the templates do not depend on the accelerator's RNG
        choice = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=generator)
        ids = top.indices.gather(-1, choice.to(top.indices.device))
        sequence = torch.cat([sequence, ids], dim=1)
    return tokenizer.batch_decode(sequence, skip_special_tokens=True)


# ---------------------------------------------------------------- keys: k and u


@torch.no_grad()
def compute_k(
    model, tokenizer, module, request: EditRequest, templates: Sequence[str], fact_token: str
) -> torch.Tensor:
    """The key ``k``: the module's input at the fact token, averaged over the context templates (float32)."""
    texts = [t.format(request.prompt) for t in templates]
    positions = [fact_token_index(tokenizer, t, request.prompt, request.subject, fact_token) for t in templates]
    input_ids, mask = pad_right([tokenizer(x)["input_ids"] for x in texts], _pad_id(tokenizer), _device(model))
    with trace_module(module) as record:
        model(input_ids=input_ids, attention_mask=mask)
    inputs = record["input"]
    keys = inputs[torch.arange(len(texts), device=inputs.device), torch.tensor(positions, device=inputs.device)]
    return keys.float().mean(0)


def compute_u(k: torch.Tensor, inv_mom2: torch.Tensor | None = None) -> torch.Tensor:
    """The left vector ``u = C^-1 k / ||C^-1 k||`` (``u = k / ||k||`` without the covariance adjustment).

    With C, the update ``right ⊗ u`` moves the value of ``k`` while disturbing the values of typical keys
    the least (the paper's constrained least squares); without it, it simply points along ``k``.
    """
    u = k.float() if inv_mom2 is None else inv_mom2.to(k.device, torch.float32) @ k.float()
    return u / u.norm()


def inverse_second_moment(mom2: torch.Tensor) -> torch.Tensor:
    """``C^-1`` in float64 for accuracy, with a relative ridge of 1e-6 that only matters for rank-deficient C."""
    c = mom2.double()
    ridge = 1e-6 * c.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.inv(c + ridge * torch.eye(c.shape[0], dtype=c.dtype)).float()


# ---------------------------------------------------------------- values: v*


@dataclass
class ValueSolution:
    """Result of ``compute_v``: the new value and the plain prompt's key/value it is written for."""

    v_star: torch.Tensor  # v_init + delta, float32
    k_plain: torch.Tensor  # module input at the fact token of the plain prompt
    out_plain: torch.Tensor  # module output there (W k_plain, plus the bias if the module has one)
    v_init_norm: float
    delta_norm: float
    nll: float
    steps: int


@dataclass
class ValueBatch:
    """The rewriting prompts plus the KL prompt as one right-padded batch, and where each loss term reads it."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    positions: list[int]  # fact token per row: where delta is added
    keep: torch.Tensor  # sequence positions whose logits are computed
    t_rows: torch.Tensor  # per target token: row, column in ``keep``, id, weight (mean per prompt, then over prompts)
    t_cols: torch.Tensor
    t_ids: torch.Tensor
    t_weight: torch.Tensor
    kl_row: int
    kl_col: int


def build_value_batch(tokenizer, request: EditRequest, templates: Sequence[str], fact_token: str, device) -> ValueBatch:
    """Rows ``template.format(prompt) + target[:-1]`` for every template, then ``"{subject} is a"``."""
    rows: list[list[int]] = []
    positions: list[int] = []
    targets: list[tuple[int, list[int]]] = []  # (first predicting position, target ids) per rewriting row
    for template in templates:
        prompt_ids, target_ids = split_prompt_target(tokenizer, template.format(request.prompt), request.target_new)
        rows.append(prompt_ids + target_ids[:-1])
        index = fact_token_index(tokenizer, template, request.prompt, request.subject, fact_token)
        positions.append(min(index, len(prompt_ids) - 1))
        targets.append((len(prompt_ids) - 1, target_ids))
    kl_text = KL_PROMPT.format(request.subject)
    rows.append(tokenizer(kl_text)["input_ids"])
    positions.append(fact_token_index(tokenizer, "{}", kl_text, request.subject, fact_token))
    kl_pos = len(rows[-1]) - 1

    # logits only where a loss term reads them: projecting every position onto the vocabulary is a large
    # share of the cost (a fifth of SmolLM2's FLOPs) and of the memory
    t_pos = [start + j for start, ids in targets for j in range(len(ids))]
    keep = sorted(set(t_pos) | {kl_pos})
    column = {p: i for i, p in enumerate(keep)}
    input_ids, mask = pad_right(rows, _pad_id(tokenizer), device)
    return ValueBatch(
        input_ids=input_ids,
        mask=mask,
        positions=positions,
        keep=torch.tensor(keep, device=device),
        t_rows=torch.tensor([r for r, (_, ids) in enumerate(targets) for _ in ids], device=device),
        t_cols=torch.tensor([column[p] for p in t_pos], device=device),
        t_ids=torch.tensor([i for _, ids in targets for i in ids], device=device),
        t_weight=torch.tensor([1 / len(ids) / len(targets) for _, ids in targets for _ in ids], device=device),
        kl_row=len(rows) - 1,
        kl_col=column[kl_pos],
    )


def compute_v(
    model, tokenizer, module, request: EditRequest, templates: Sequence[str], hp: RomeHyperParams
) -> ValueSolution:
    """Optimise ``delta`` added to the module output at the fact token so that the model states the target.

    Loss = mean target NLL over the rewriting prompts ``template.format(prompt) + target[:-1]``
    + ``kl_factor`` * KL(original || edited) of the next token after ``"{subject} is a"``
    + ``v_weight_decay`` * ``||delta||^2 / ||v_init||^2``. ``templates[0]`` must be the plain ``"{}"``.
    """
    batch = build_value_batch(tokenizer, request, templates, hp.fact_token, _device(model))
    positions = batch.positions

    def next_token_log_probs() -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.mask, logits_to_keep=batch.keep).logits
        return logits.float().log_softmax(-1)

    with torch.no_grad(), trace_module(module) as record:
        kl_reference = next_token_log_probs()[batch.kl_row, batch.kl_col]
    k_plain = record["input"][0, positions[0]].float()
    out_plain = record["output"][0, positions[0]].float()
    v_init = out_plain  # templates[0] is the plain prompt, so its value is where the optimisation starts
    max_norm = hp.clamp_norm_factor * v_init.norm()

    delta = torch.zeros_like(v_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    nll_value, steps = float("nan"), 0
    with frozen_parameters(model), torch.enable_grad(), add_to_output(module, positions, delta):
        for step in range(hp.v_num_grad_steps + 1):
            log_probs = next_token_log_probs()
            nll = -(log_probs[batch.t_rows, batch.t_cols, batch.t_ids] * batch.t_weight).sum()
            kl = F.kl_div(log_probs[batch.kl_row, batch.kl_col], kl_reference, log_target=True, reduction="sum")
            decay = delta.norm() ** 2 / v_init.norm() ** 2
            loss = nll + hp.kl_factor * kl + hp.v_weight_decay * decay
            nll_value = nll.item()
            # the last pass only measures the final delta
            if nll_value < hp.early_stop_loss or step == hp.v_num_grad_steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            with torch.no_grad():  # keep the new value within a ball around the old one
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    delta = delta.detach()
    return ValueSolution(
        v_star=v_init + delta,
        k_plain=k_plain,
        out_plain=out_plain,
        v_init_norm=v_init.norm().item(),
        delta_norm=delta.norm().item(),
        nll=nll_value,
        steps=steps,
    )


# ---------------------------------------------------------------- the rank-one update


def compute_right(u: torch.Tensor, solution: ValueSolution) -> torch.Tensor:
    """``right = (v* - W k) / (k · u)`` at the plain prompt, so that ``(W + right ⊗ u) k = v*``."""
    return (solution.v_star - solution.out_plain) / torch.dot(solution.k_plain, u)


def rank_one_delta(parameter: str, module, u: torch.Tensor, right: torch.Tensor) -> WeightDelta:
    """``dW = right ⊗ u`` as ``b @ a`` in the weight's own layout.

    ``nn.Linear`` stores ``[out, in]``: ``b = right`` (column), ``a = u`` (row). GPT-2's ``Conv1D`` stores
    ``[in, out]`` and computes ``x @ W``: the same change is ``b = u``, ``a = right``.
    """
    right, u = right.float(), u.float()
    if isinstance(module, torch.nn.Linear):
        return WeightDelta(parameter=parameter, b=right[:, None], a=u[None, :])
    if type(module).__name__ == "Conv1D":
        return WeightDelta(parameter=parameter, b=u[:, None], a=right[None, :])
    raise TypeError(f"ROME edits nn.Linear or Conv1D modules, not {type(module).__name__}")
