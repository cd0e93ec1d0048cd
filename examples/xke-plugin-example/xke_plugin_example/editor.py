"""`ft_down`: a norm-bounded, low-rank fine-tune of one MLP down-projection on the edit prompt and target.

The update ``dW = B @ A`` (``B`` starts at zero, so the model starts unedited) is trained with Adam to make the
model continue each edit prompt with ``" " + target_new``. After every step ``B`` is rescaled so that
``||dW||_F <= max_norm_ratio * ||W||_F``: the edit can never move the layer far from its original weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.model_state import frozen_parameters
from lm_eval_xke.editors import AppliedEdit, Editor, HyperParams, WeightDelta, apply_weight_deltas


@dataclass
class DownProjFineTuneHyperParams(HyperParams):
    layer: int = field(default=1, metadata={"help": "index of the layer whose MLP down-projection is tuned"})
    module_template: str = field(
        default="model.layers.{}.mlp.down_proj", metadata={"help": "module path; {} is the layer"}
    )
    rank: int = field(default=4, metadata={"help": "rank of the update B @ A"})
    steps: int = field(default=20, metadata={"help": "Adam steps"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate"})
    max_norm_ratio: float = field(default=0.1, metadata={"help": "bound on ||dW||_F / ||W||_F"})
    stop_loss: float = field(default=0.01, metadata={"help": "stop early once the target loss is below this"})
    init_seed: int = field(default=0, metadata={"help": "seed of the random init of A"})


class DownProjFineTuneEditor(Editor):
    """Constrained fine-tune of one down-projection; all requests of a batch are trained together."""

    name = "ft_down"
    hparams_class = DownProjFineTuneHyperParams
    family_defaults = {"gpt2": {"module_template": "transformer.h.{}.mlp.c_proj"}}
    supports_batch = True

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        assert isinstance(hparams, DownProjFineTuneHyperParams)
        module_name = hparams.module_template.format(hparams.layer)
        module = model.get_submodule(module_name)
        examples = [encode(tokenizer, r, module.weight.device) for r in requests]
        b, a, loss = train_update(model, module, examples, hparams)
        delta = WeightDelta(f"{module_name}.weight", b, a)
        return apply_weight_deltas(model, [delta], info={"final_loss": loss, "delta_norm": float(delta.dense().norm())})


def encode(tokenizer, request: EditRequest, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids of prompt + " " + target, and labels that score the target tokens only."""
    prompt = tokenizer(request.prompt)["input_ids"]
    target = tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + target], device=device)
    labels = torch.tensor([[-100] * len(prompt) + target], device=device)
    return ids, labels


def train_update(model, module, examples, hp: DownProjFineTuneHyperParams) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Train ``B`` and ``A`` of ``dW = B @ A`` (in the weight's own layout) under the norm bound."""
    weight = module.weight.detach().float()
    rows, cols = weight.shape
    generator = torch.Generator().manual_seed(hp.init_seed)
    a = (torch.randn(hp.rank, cols, generator=generator) / cols**0.5).to(weight.device).requires_grad_(True)
    b = torch.zeros(rows, hp.rank, device=weight.device, requires_grad=True)
    bound = hp.max_norm_ratio * weight.norm()
    optimizer = torch.optim.Adam([b, a], lr=hp.lr)
    loss_value = float("nan")
    with frozen_parameters(model), torch.enable_grad(), added_output(module, b, a):
        for _ in range(hp.steps):
            optimizer.zero_grad()
            loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in examples) / len(examples)
            loss_value = float(loss)
            if loss_value < hp.stop_loss:
                break
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                norm = (b @ a).norm()
                if norm > bound:
                    b.mul_(bound / norm)
    return b.detach(), a.detach(), loss_value


@contextmanager
def added_output(module, b: torch.Tensor, a: torch.Tensor):
    """Add the output of ``dW = b @ a`` to ``module`` (nn.Linear: [out, in]; GPT-2 Conv1D: [in, out])."""
    linear = isinstance(module, torch.nn.Linear)

    def hook(mod, inputs, output):
        x = inputs[0].float()
        extra = (x @ a.T) @ b.T if linear else (x @ b) @ a
        return output + extra.to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
