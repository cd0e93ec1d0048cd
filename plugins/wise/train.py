"""Training one WISE edit: masked SGD of the current shard on the target NLL plus the routing loss."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lm_eval_xke.editing.hooks import trace_module
from lm_eval_xke.editing.model_state import frozen_parameters
from lm_eval_xke.editing.rewriting import ValueBatch, paths_agree, target_nll

from .compute import (
    EARLY_STOP_CHANGE,
    EARLY_STOP_LOSS,
    aligned_forward,
    apply_delta,
    decoder_blocks,
    masked_sgd_step,
    recorded_outputs,
    replayed_blocks,
    routing_loss,
    sequence_scores,
)
from .config import WiseHyperParams
from .memory import Shard, SideMemory

log = logging.getLogger("lm_eval.models.xke.wise")


@dataclass
class EditRows:
    """What one edit trains on: the rewriting rows and the irrelevant prompts' module inputs."""

    batch: ValueBatch  # every request under every context template
    n_templates: int  # rows per request; the first of each request is its plain prompt
    irrelevant_inputs: torch.Tensor  # module inputs of the irrelevant prompts, [rows, tokens, d_in]
    irrelevant_valid: torch.Tensor  # their real-token mask, [rows, tokens]


@dataclass
class ShardTraining:
    nll: float  # mean target NLL at the end
    routing_loss: float
    edit_scores: list[float]  # per request, mean activation score of its rows at the end: the threshold's basis
    irrelevant_score: float  # highest activation score of the irrelevant prompts at the end
    steps: int
    plain_right: bool  # every request's plain prompt predicts its target's first token


def train_shard(model, module, memory: SideMemory, shard: Shard, rows: EditRows, pad_id: int, hp: WiseHyperParams):
    """Train ``shard.delta`` in place by masked SGD on ``target NLL + L_a`` (the paper's knowledge sharding).

    While training, every row goes through this shard (``memory.training_delta``); the routing loss's scores use
    the module inputs recorded once, which the side memory cannot change. Stops early as EasyEdit does.
    """
    batch = rows.batch
    main = module.weight.detach().float()
    reads = plain_reads(batch, rows.n_templates)
    delta = shard.delta
    memory.training_delta = delta
    previous, steps = float("inf"), 0
    try:
        forward, edit_inputs, edit_valid = training_forward(model, module, batch, pad_id, hp)
        delta.requires_grad_(True)
        with frozen_parameters(model), torch.enable_grad():
            for step in range(hp.n_iter + 1):
                log_probs = forward()
                nll = target_nll(log_probs, batch)
                edit = sequence_scores(apply_delta(module, edit_inputs, delta), edit_valid)
                unrelated = sequence_scores(apply_delta(module, rows.irrelevant_inputs, delta), rows.irrelevant_valid)
                act = routing_loss(edit, unrelated, hp)
                loss = nll + act
                settled = loss.item() <= EARLY_STOP_LOSS and abs(loss.item() - previous) <= EARLY_STOP_CHANGE
                if settled or step == hp.n_iter:  # the last pass only measures
                    break
                delta.grad = None
                loss.backward()
                masked_sgd_step(delta, shard.mask, main, hp)
                previous, steps = loss.item(), steps + 1
    finally:
        delta.requires_grad_(False)
        delta.grad = None
        memory.training_delta = None
    return ShardTraining(
        nll=nll.item(),
        routing_loss=act.item(),
        edit_scores=edit.view(-1, rows.n_templates).mean(1).tolist(),
        irrelevant_score=unrelated.max().item(),
        steps=steps,
        plain_right=bool((log_probs[reads].argmax(-1) == batch.t_ids[reads]).all()),
    )


def training_forward(model, module, batch: ValueBatch, pad_id: int, hp: WiseHyperParams):
    """The log-probs at the batch's reads as a function to call once per step, the module's inputs on the rows and
    their real-token mask.

    The blocks before the edited one replay their outputs instead of computing (the side memory cannot change
    them). The replaying path is checked once against the full forward, which is used instead if they disagree
    (never a silently wrong gradient) or if the model's blocks are not found.
    """
    full, valid = aligned_forward(model, batch, pad_id)
    blocks = decoder_blocks(model, hp.module_name)
    earlier = list(blocks[0][: blocks[1]]) if blocks is not None else []
    with torch.no_grad(), recorded_outputs(earlier) as outputs, trace_module(module) as record:
        reference = full()
    inputs = record["input"]
    if blocks is None:
        return full, inputs, valid

    def replaying() -> torch.Tensor:
        with replayed_blocks(earlier, outputs):
            return full()

    with torch.no_grad():
        if paths_agree(replaying(), reference, module.weight.dtype):
            return replaying, inputs, valid
    log.warning("WISE: replaying the blocks before layer %d changes the logits; using the full forward", blocks[1])
    return full, inputs, valid


def plain_reads(batch: ValueBatch, n_templates: int) -> torch.Tensor:
    """The read of each request's first target token after its plain prompt (template ``"{}"``, the first)."""
    rows = batch.read_rows.tolist()
    return torch.tensor([rows.index(r) for r in range(0, len(batch.rows), n_templates)], device=batch.t_ids.device)
