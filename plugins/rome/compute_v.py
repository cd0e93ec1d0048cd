"""ROME's value step (``compute_v``, Meng et al. 2022, section 3.1 eq. 4), batched over requests.

For each request, optimise ``delta`` added to the edited module's output at the fact token so that the model
states the new target from the rewriting prompts, while the KL term on ``"{subject} is a"`` keeps what the model
says the subject is. MEMIT and AlphaEdit optimise their values at their last layer the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hidden_states import padding_id
from lm_eval_xke.editing.hooks import device_of
from lm_eval_xke.editing.model_state import frozen_parameters
from lm_eval_xke.editing.rewriting import (
    LogProbs,
    Reference,
    ValueBatch,
    cached_forward,
    full_forward,
    reference_pass,
    self_checked,
    value_forward,
)
from lm_eval_xke.editing.tokens import fact_token_index, split_prompt_target

from .config import ValueHyperParams

#: The paper's "essence" prompt: the KL term keeps what the model says the subject *is*.
KL_PROMPT = "{} is a"


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
        self.device = device_of(model)
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
    device = device_of(model)
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
