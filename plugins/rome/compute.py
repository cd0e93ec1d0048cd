"""The math of ROME (Meng et al. 2022, arXiv 2202.05262), one small function per step of the paper.

ROME treats an MLP output projection ``W`` as a key-value memory: the key ``k`` is the module's input at the
subject's last token and ``W k`` its value. An edit finds a value ``v*`` that makes the model state the new
target (``compute_v``) and writes it with the rank-one update ``dW = right ⊗ u`` so that ``W' k = v*``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editors import WeightDelta
from lm_eval_xke.hidden_states import padding_id, project_reads
from lm_eval_xke.model_state import frozen_parameters
from lm_eval_xke.stats import pad_right

from .config import ValueHyperParams

#: First words of the sampled context prefixes, as in the original ROME code.
START_WORDS = ("The", "Therefore", "Because", "I", "You")
#: The paper's "essence" prompt: the KL term keeps what the model says the subject *is*.
KL_PROMPT = "{} is a"

# under lm-eval's logger tree, next to the xke model's lines
log = logging.getLogger("lm_eval.models.xke.rome")


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


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- context templates

#: per model (weakly keyed, so a dropped model frees its entry): templates by (lengths, per_length, seed)
_TEMPLATES: WeakKeyDictionary = WeakKeyDictionary()


def context_templates(
    model,
    tokenizer,
    lengths: Sequence[int],
    per_length: int,
    seed: int,
    total_length: bool = False,
    normalise: bool = False,
) -> list[str]:
    """``generate_context_templates`` once per model and settings, then reused by every edit and every editor."""
    per_model = _TEMPLATES.setdefault(model, {})
    settings = (tuple(lengths), per_length, seed, total_length, normalise)
    if settings not in per_model:
        per_model[settings] = generate_context_templates(model, tokenizer, *settings)
    return per_model[settings]


def generate_context_templates(
    model,
    tokenizer,
    lengths: Sequence[int],
    per_length: int,
    seed: int,
    total_length: bool = False,
    normalise: bool = False,
) -> list[str]:
    """``["{}"]`` plus ``"<prefix>. {}"`` for prefixes sampled from the model itself (top-k 5).

    Averaging keys and losses over such prefixes makes the edit hold in contexts other than the bare prompt.
    A prefix is its start word and ``length`` sampled tokens, or with ``total_length`` ``length`` tokens in all
    (start word and BOS included, as EasyEdit's ``generate_fast``); ``normalise`` applies ``generate_fast``'s NFKD
    and blank-line clean-up. Sampling uses a private generator seeded with ``seed``, so the templates are
    reproducible and the global RNG state of the caller is left untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    templates = ["{}"]
    for length in lengths:
        counts = [per_length // len(START_WORDS) + (i < per_length % len(START_WORDS)) for i in range(len(START_WORDS))]
        for word, count in zip(START_WORDS, counts, strict=True):
            new_tokens = max(0, length - len(tokenizer(word)["input_ids"])) if total_length else length
            if count:
                for text in sample_continuations(model, tokenizer, word, count, new_tokens, generator):
                    if normalise:
                        text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
                    # braces would break str.format; otherwise the text is kept as the model wrote it
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
    input_ids, mask = pad_right([tokenizer(x)["input_ids"] for x in texts], padding_id(tokenizer), _device(model))
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
    """Result of ``compute_v``: the new value, the key it is written for and the plain prompt's key/value."""

    v_star: torch.Tensor  # v_init + delta, float32
    k: torch.Tensor  # the key: module input at the fact token averaged over the templates (``compute_k``)
    k_plain: torch.Tensor  # module input at the fact token of the plain prompt
    out_plain: torch.Tensor  # module output there (W k_plain, plus the bias if the module has one)
    v_init_norm: float
    delta_norm: float
    nll: float  # mean target NLL over the rewriting prompts at the final delta
    plain_right: bool  # whether the plain prompt then predicts every target token (argmax)
    steps: int


@dataclass
class ValueBatch:
    """The rewriting prompts plus the KL prompt, and where the loss reads their next-token log-probs.

    The reads are every target token of every rewriting row, in row order, then the KL prompt's last token.
    """

    rows: list[list[int]]  # ``template.format(prompt) + target[:-1]`` per template, then ``"{subject} is a"``
    positions: list[int]  # fact token per row: where delta is added
    read_rows: torch.Tensor  # per read: its row
    read_cols: torch.Tensor  # per read: the position whose next-token distribution is read
    t_ids: torch.Tensor  # per target token (the first reads): its id
    t_weight: torch.Tensor  # per target token: 1 / len(target) / n_prompts (mean per prompt, then over prompts)


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

    read_rows = [r for r, (_, ids) in enumerate(targets) for _ in ids] + [len(rows) - 1]
    read_cols = [start + j for start, ids in targets for j in range(len(ids))] + [len(rows[-1]) - 1]
    return ValueBatch(
        rows=rows,
        positions=positions,
        read_rows=torch.tensor(read_rows, device=device),
        read_cols=torch.tensor(read_cols, device=device),
        t_ids=torch.tensor([i for _, ids in targets for i in ids], device=device),
        t_weight=torch.tensor([1 / len(ids) / len(targets) for _, ids in targets for _ in ids], device=device),
    )


#: ``delta -> log-probs [n_reads, vocab]`` of a value batch with ``delta`` added at the fact tokens (None: nothing).
#: ``delta`` is one vector for every row or one per row (``[rows, d_out]``).
LogProbs = Callable[[torch.Tensor | None], torch.Tensor]


def _with_delta(module, positions: Sequence[int], delta: torch.Tensor | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if delta is None else add_to_output(module, positions, delta)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-probs of the reads, ``[n_reads, vocab]``, from ``project_reads``'s logits."""
    return logits[0].float().log_softmax(-1)


def full_forward(model, module, batch: ValueBatch, pad_id: int) -> LogProbs:
    """Every row from its first token, right-padded: the reference path."""
    input_ids, mask = pad_right(batch.rows, pad_id, _device(model))

    def run(delta: torch.Tensor | None) -> torch.Tensor:
        with _with_delta(module, batch.positions, delta), project_reads(model, batch.read_rows, batch.read_cols):
            return _log_probs(model(input_ids=input_ids, attention_mask=mask).logits)

    return run


@dataclass
class Reference:
    """The unedited model on a value batch: what the loss compares against, and what stays fixed while optimising."""

    log_probs: torch.Tensor  # at the reads, [n_reads, vocab]
    keys: torch.Tensor  # module input at every row's fact token, float32 [rows, d_in]
    values: torch.Tensor  # module output there, float32 [rows, d_out]
    prefix: list[tuple] | None  # KV cache of the tokens before the fact tokens (``prefix_cache``)

    def select(self, rows: torch.Tensor, reads: torch.Tensor, width: int) -> Reference:
        """The reference of a sub-batch: those rows and reads, the prefixes cut to the sub-batch's ``width``."""
        prefix = None
        if self.prefix is not None and width > 0:
            # prefixes end at one common column, so a narrower sub-batch keeps the last `width` slots
            prefix = [(e[0][rows, :, -width:], e[1][rows, :, -width:], *e[2:]) for e in self.prefix]
        return Reference(self.log_probs[reads], self.keys[rows], self.values[rows], prefix)


@torch.no_grad()
def reference_pass(model, module, batch: ValueBatch, pad_id: int) -> Reference:
    """``full_forward`` at delta = 0, also recording the keys, the values and the prefixes' KV cache."""
    input_ids, mask = pad_right(batch.rows, pad_id, _device(model))
    with trace_module(module) as record, project_reads(model, batch.read_rows, batch.read_cols):
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    rows = torch.arange(len(batch.rows), device=input_ids.device)
    positions = torch.tensor(batch.positions, device=input_ids.device)
    width = max(batch.positions)
    return Reference(
        log_probs=_log_probs(out.logits),
        keys=record["input"][rows, positions].float(),
        values=record["output"][rows, positions].float(),
        prefix=prefix_cache(out.past_key_values, batch.positions, input_ids.shape[1]) if width else None,
    )


def prefix_cache(cache, lengths: Sequence[int], total: int) -> list[tuple] | None:
    """The keys and values of each row's first ``lengths[row]`` tokens, left-padded to one common end.

    ``cache`` is the KV cache of the right-padded full rows (``total`` positions): row r's prefix occupies its
    first ``lengths[r]`` positions and already carries the positions 0..lengths[r]-1 it must keep (rotary or
    absolute). Moving every prefix to the right end of ``max(lengths)`` slots lets all suffixes continue at
    the same cache column; the slots before a shorter prefix hold copies of its first token, hidden by the
    attention mask. None for other cache classes and where a layer does not hold all ``total`` positions (a
    sliding window shorter than the rows, KV sharing): such a cache cannot be realigned.
    """
    entries = list(cache) if isinstance(cache, DynamicCache) else []
    if not entries or any(e[0] is None or e[0].shape[-2] != total for e in entries):
        return None
    width = max(lengths)
    device = entries[0][0].device
    shift = width - torch.tensor(lengths, device=device)[:, None]
    source = (torch.arange(width, device=device) - shift).clamp_min(0)  # [rows, width]: cache column per slot

    def realign(states: torch.Tensor) -> torch.Tensor:
        return states.gather(2, source[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1]))

    # a sliding-window layer keeps its window size (the third element), so the rebuilt cache is of its kind
    return [(realign(e[0]), realign(e[1]), *e[2:]) for e in entries]


def cached_forward(model, module, batch: ValueBatch, pad_id: int, prefix: list[tuple] | None) -> LogProbs:
    """The same log-probs as ``full_forward``, running only each row's suffix (fact token onward) per call.

    delta enters at the fact token, so every token before it sees the same model at every step: ``prefix``
    holds their keys and values (``prefix_cache``, left-aligned to one common end), and each call runs the
    suffixes (right-padded, with their own position ids) against a fresh cache built from it.
    """
    device = _device(model)
    split = torch.tensor(batch.positions, device=device)
    suffix_ids, suffix_mask = pad_right(
        [row[p:] for row, p in zip(batch.rows, batch.positions, strict=True)], pad_id, device
    )
    position_ids = split[:, None] + torch.arange(suffix_ids.shape[1], device=device)
    width = max(batch.positions)
    prefix_mask = (torch.arange(width, device=device) >= width - split[:, None]).long()
    mask = torch.cat([prefix_mask, suffix_mask], dim=1)
    read_cols = batch.read_cols - split[batch.read_rows]
    fact_columns = [0] * len(batch.rows)  # the fact token opens every suffix

    def run(delta: torch.Tensor | None) -> torch.Tensor:
        # a fresh cache per call: the forward appends the suffixes' keys and values to it, while the prefix
        # tensors themselves are never written to
        cache = DynamicCache(prefix) if prefix is not None else None
        with _with_delta(module, fact_columns, delta), project_reads(model, batch.read_rows, read_cols):
            logits = model(
                input_ids=suffix_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
            ).logits
        return _log_probs(logits)

    return run


def paths_agree(cached: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the cached path reproduces the full forward's log-probs up to the model dtype's rounding."""
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    return bool(torch.allclose(cached, reference, rtol=0.0, atol=tolerance))


def weight_decay(delta: torch.Tensor, v_init: torch.Tensor) -> torch.Tensor:
    """``||delta|| / ||v_init||^2`` (per row of ``[edits, d]``), the regulariser of the original ROME code."""
    return delta.norm(dim=-1) / v_init.norm(dim=-1) ** 2


def clamp_rows(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale every row of ``delta`` whose norm exceeds its ``max_norm`` back onto that ball (in place)."""
    norms = delta.norm(dim=-1, keepdim=True)
    delta.mul_(torch.where(norms > max_norm[:, None], max_norm[:, None] / norms, 1.0))


def converged(nll: float, loss: float, plain_right: bool, hp: ValueHyperParams) -> bool:
    """Below ``early_stop_loss``: the mean target NLL, or with ``early_stop_on=loss`` the whole loss (EasyEdit and
    the original code); and with ``early_stop_plain`` the plain prompt already predicting every target token: the
    evaluation asks the plain prompt, and a mean over 21 prompts can fall below the threshold while the plain
    prompt's first token is still wrong."""
    measured = loss if hp.early_stop_on == "loss" else nll
    return measured < hp.early_stop_loss and (plain_right or not hp.early_stop_plain)


def value_forward(model, module, batch: ValueBatch, pad_id: int, reference: Reference) -> LogProbs:
    """The cached path where the prefixes' KV cache could be taken (or there are no prefixes), else the full one."""
    if reference.prefix is None and max(batch.positions) > 0:
        log.warning(
            "the KV cache of %s cannot be reused for the prefixes; using the full forward (slower)",
            model.config.model_type,
        )
        return full_forward(model, module, batch, pad_id)
    return cached_forward(model, module, batch, pad_id, reference.prefix)


def self_checked(
    model, module, batch: ValueBatch, pad_id: int, reference: Reference, forward: LogProbs, delta: torch.Tensor
) -> tuple[LogProbs, torch.Tensor]:
    """The first step's log-probs, and the forward to keep: ``forward`` if it reproduces the reference pass.

    delta is still 0 at the first step, so the cached path must give the reference log-probs. An architecture
    whose cache does not (e.g. one that ignores position ids) gets the full forward, with a warning: never a
    silently wrong answer.
    """
    log_probs = forward(delta)
    if paths_agree(log_probs.detach(), reference.log_probs, module.weight.dtype):
        return forward, log_probs
    log.warning(
        "the KV-cached value optimisation disagrees with the full forward on %s; using the full forward (slower)",
        model.config.model_type,
    )
    full = full_forward(model, module, batch, pad_id)
    return full, full(delta)


@dataclass
class EditStack:
    """Several edits' value batches as one batch (rows never attend across edits), and where each edit lies in it.

    Each part is ``build_value_batch``'s layout: its target reads, then its KL read.
    """

    batch: ValueBatch
    edits: list[int]  # the stacked edits (indices into the parts)
    row_edit: torch.Tensor  # per row: its edit's position in ``edits``
    plain_rows: torch.Tensor  # per edit: its plain prompt's row (its first)
    kl_reads: torch.Tensor  # per edit: its KL read
    target_reads: torch.Tensor  # the reads of target tokens, in the order of ``batch.t_ids``
    target_edit: torch.Tensor  # per target read: its edit's position in ``edits``
    target_plain: torch.Tensor  # per target read: whether the plain prompt's row makes it
    rows: torch.Tensor  # the rows' indices in the stack of every part (``Reference.select``)
    reads: torch.Tensor  # the reads' indices there


def stack_edits(parts: Sequence[ValueBatch], edits: Sequence[int], device) -> EditStack:
    """Stack ``parts[e]`` for ``e`` in ``edits``, keeping each part's rows and reads together and in order."""
    row_starts = [0, *itertools.accumulate(len(p.rows) for p in parts)]
    read_starts = [0, *itertools.accumulate(len(p.read_rows) for p in parts)]
    rows, reads, row_edit, plain_rows, kl_reads, target_reads, target_edit = [], [], [], [], [], [], []
    for i, e in enumerate(edits):
        part, row_offset, read_offset = parts[e], len(rows), len(reads)
        n_targets = len(part.t_ids)
        plain_rows.append(row_offset)
        kl_reads.append(read_offset + n_targets)
        target_reads.extend(range(read_offset, read_offset + n_targets))
        target_edit.extend([i] * n_targets)
        row_edit.extend([i] * len(part.rows))
        rows.extend(range(row_starts[e], row_starts[e + 1]))
        reads.extend(range(read_starts[e], read_starts[e + 1]))
    chosen = [parts[e] for e in edits]
    row_offsets = [0, *itertools.accumulate(len(p.rows) for p in chosen)][:-1]
    batch = ValueBatch(
        rows=[row for p in chosen for row in p.rows],
        positions=[q for p in chosen for q in p.positions],
        read_rows=torch.cat([p.read_rows + o for p, o in zip(chosen, row_offsets, strict=True)]),
        read_cols=torch.cat([p.read_cols for p in chosen]),
        t_ids=torch.cat([p.t_ids for p in chosen]),
        t_weight=torch.cat([p.t_weight for p in chosen]),
    )
    return EditStack(
        batch=batch,
        edits=list(edits),
        row_edit=torch.tensor(row_edit, device=device),
        plain_rows=torch.tensor(plain_rows, device=device),
        kl_reads=torch.tensor(kl_reads, device=device),
        target_reads=torch.tensor(target_reads, device=device),
        target_edit=torch.tensor(target_edit, device=device),
        target_plain=torch.cat([p.read_rows[: len(p.t_ids)] == 0 for p in chosen]),
        rows=torch.tensor(rows, device=device),
        reads=torch.tensor(reads, device=device),
    )


@dataclass
class EditLosses:
    """Per stacked edit: the loss to minimise and what the early stop looks at."""

    loss: torch.Tensor  # nll + kl_factor * KL + v_weight_decay * weight decay, [edits]
    nll: list[float]
    total: list[float]  # ``loss``'s values
    plain_right: list[bool]


def edit_losses(
    log_probs: torch.Tensor, stack: EditStack, reference: Reference, delta: torch.Tensor, hp: ValueHyperParams
) -> EditLosses:
    """Each edit's loss from the stack's log-probs (``delta``: the stacked edits' rows, ``[edits, d_out]``)."""
    batch, n_edits = stack.batch, len(stack.edits)
    target_log_probs = log_probs[stack.target_reads]
    token_nll = -target_log_probs.gather(1, batch.t_ids[:, None])[:, 0] * batch.t_weight
    nll = torch.zeros(n_edits, device=log_probs.device).index_add(0, stack.target_edit, token_nll)
    # the paper's D_KL(P_edited || P_original) on "{subject} is a"
    kl = F.kl_div(
        reference.log_probs[stack.kl_reads], log_probs[stack.kl_reads], log_target=True, reduction="none"
    ).sum(-1)
    v_init = reference.values[stack.plain_rows]
    loss = nll + hp.kl_factor * kl + hp.v_weight_decay * weight_decay(delta, v_init)
    wrong = (target_log_probs.argmax(-1) != batch.t_ids) & stack.target_plain
    wrong_per_edit = torch.zeros(n_edits, device=log_probs.device).index_add(0, stack.target_edit, wrong.float())
    return EditLosses(loss, nll.tolist(), loss.detach().tolist(), (wrong_per_edit == 0).tolist())


class StackedForward:
    """The log-probs of any subset of the edits, on the KV-cached path unless it failed its first-step check."""

    def __init__(self, model, module, parts: Sequence[ValueBatch], pad_id: int, use_cache: bool) -> None:
        self.model, self.module, self.parts, self.pad_id = model, module, parts, pad_id
        self.device = _device(model)
        self.full = stack_edits(parts, range(len(parts)), self.device)
        self.reference = reference_pass(model, module, self.full.batch, pad_id)
        self.use_cache = use_cache

    def first(self, delta: torch.Tensor) -> torch.Tensor:
        """All edits at the first step (delta = 0): the cached path is checked against the reference pass here."""
        batch, rows = self.full.batch, delta[self.full.row_edit]
        if not self.use_cache:
            return full_forward(self.model, self.module, batch, self.pad_id)(rows)
        cached = value_forward(self.model, self.module, batch, self.pad_id, self.reference)
        forward, log_probs = self_checked(self.model, self.module, batch, self.pad_id, self.reference, cached, rows)
        self.use_cache = forward is cached and not (self.reference.prefix is None and max(batch.positions) > 0)
        return log_probs

    def subset(self, edits: Sequence[int]) -> tuple[EditStack, Reference, LogProbs]:
        """The stack of ``edits`` (still optimised), its reference, and its forward (``delta`` per row)."""
        stack = stack_edits(self.parts, edits, self.device)
        reference = self.reference.select(stack.rows, stack.reads, max(stack.batch.positions))
        if self.use_cache:
            forward = cached_forward(self.model, self.module, stack.batch, self.pad_id, reference.prefix)
        else:
            forward = full_forward(self.model, self.module, stack.batch, self.pad_id)
        return stack, reference, forward


def compute_values(
    model, tokenizer, module, requests: Sequence[EditRequest], templates: Sequence[str], hp: ValueHyperParams
) -> list[ValueSolution]:
    """``compute_v`` of every request against the same (unedited) model, ``v_batch_size`` requests per batch."""
    size = max(1, hp.v_batch_size)
    return [
        solution
        for start in range(0, len(requests), size)
        for solution in optimise_values(model, tokenizer, module, requests[start : start + size], templates, hp)
    ]


def compute_v(
    model, tokenizer, module, request: EditRequest, templates: Sequence[str], hp: ValueHyperParams
) -> ValueSolution:
    """The value of one request: ``optimise_values`` with a single edit."""
    (solution,) = optimise_values(model, tokenizer, module, [request], templates, hp)
    return solution


def optimise_values(
    model, tokenizer, module, requests: Sequence[EditRequest], templates: Sequence[str], hp: ValueHyperParams
) -> list[ValueSolution]:
    """Optimise, per request, ``delta`` added to the module output at the fact token so that the model states its
    target; the requests share each forward and backward pass but not their results.

    Loss per request = mean target NLL over the rewriting prompts ``template.format(prompt) + target[:-1]``
    + ``kl_factor`` * KL(edited || original) of the next token after ``"{subject} is a"``
    + ``v_weight_decay`` * ``||delta|| / ||v_init||^2``. ``templates[0]`` must be the plain ``"{}"``.
    Only each row's suffix (fact token onward) is recomputed per step (``cached_forward``). Each request has its
    own row of ``delta``, whose gradient comes from its own rows only (Adam is element-wise); a request that has
    converged leaves the batch and its row is frozen, so every result equals optimising that request alone.
    """
    device = _device(model)
    parts = [build_value_batch(tokenizer, r, templates, hp.fact_token, device) for r in requests]
    paths = StackedForward(model, module, parts, padding_id(tokenizer), hp.v_prefix_cache)
    full = paths.full
    v_init = paths.reference.values[full.plain_rows]  # the plain prompt's value is where the optimisation starts
    max_norm = hp.clamp_norm_factor * v_init.norm(dim=-1)
    delta = torch.zeros_like(v_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    results: dict[int, tuple[float, bool, int]] = {}  # per request: (nll, plain_right, steps) when it stopped
    active, stopped = list(range(len(requests))), []
    stack, reference, forward = full, paths.reference, None
    with frozen_parameters(model), torch.enable_grad():
        for step in range(hp.v_num_grad_steps + 1):
            rows = delta[active]
            log_probs = paths.first(delta) if forward is None else forward(rows[stack.row_edit])
            losses = edit_losses(log_probs, stack, reference, rows, hp)
            # the last pass only measures the final delta
            done = {
                i
                for i in range(len(active))
                if converged(losses.nll[i], losses.total[i], losses.plain_right[i], hp) or step == hp.v_num_grad_steps
            }
            for i in done:
                results[active[i]] = (losses.nll[i], losses.plain_right[i], step)
            if len(done) == len(active):
                break
            optimizer.zero_grad()
            losses.loss[[i for i in range(len(active)) if i not in done]].sum().backward()
            stopped += [active[i] for i in sorted(done)]
            frozen = delta.detach()[stopped].clone()
            optimizer.step()
            with torch.no_grad():
                delta[stopped] = frozen  # Adam's momentum would still move a stopped request's row
                clamp_rows(delta, max_norm)  # keep each new value within a ball around its old one
            if done or forward is None:
                active = [e for i, e in enumerate(active) if i not in done]
                stack, reference, forward = paths.subset(active)
    return [solution(paths, e, delta.detach()[e], *results[e]) for e in range(len(requests))]


def solution(paths: StackedForward, edit: int, delta: torch.Tensor, nll: float, right: bool, steps: int):
    """Request ``edit``'s ``ValueSolution`` from the reference pass and its final ``delta``."""
    rows = paths.full.rows[paths.full.row_edit == edit]
    keys, v_init = paths.reference.keys[rows], paths.reference.values[rows[0]]
    return ValueSolution(
        v_star=v_init + delta,
        k=keys[:-1].mean(0),  # the templates' rows, not the KL prompt's
        k_plain=keys[0],
        out_plain=v_init,
        v_init_norm=v_init.norm().item(),
        delta_norm=delta.norm().item(),
        nll=nll,
        plain_right=right,
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
