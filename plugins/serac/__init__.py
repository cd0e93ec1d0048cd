"""SERAC, semi-parametric editing with a retrieval-augmented counterfactual model (Mitchell et al. 2022,
arXiv 2206.06520): edits go to a memory; a scope classifier decides whether a question concerns a remembered edit;
in-scope questions are answered by a counterfactual model given that edit, the others by the unchanged base model.

Offline choices (see README): the scope classifier is a trained head on the base model's own mean-pooled hidden
states (``compute.py``, trained by ``lm-eval-xke train serac``); the counterfactual model is the base model itself,
prompted with the retrieved edit. No weight changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.hidden_states import decoder_blocks, mean_pooled
from lm_eval_xke.editing.in_context import chat_layout, insert_context
from lm_eval_xke.editing.in_force import EditsInForce
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams
from lm_eval_xke.training import LoadedTrainables, Trainable, TrainRecord

from .compute import ScopeHead, balanced_bce
from .config import SeracHyperParams, SeracTrainHyperParams


class ScopeClassifier(Trainable):
    """The trained part of SERAC: a :class:`ScopeHead` over one block of the frozen base model."""

    def __init__(self, model, tokenizer, hp: SeracTrainHyperParams) -> None:
        super().__init__()
        # tuples, so the frozen base model and its pooled block are not submodules of the classifier
        self._base = (model, tokenizer, decoder_blocks(model)[hp.block(model.config.num_hidden_layers)])
        self.head = ScopeHead(model.config.hidden_size, hp.proj_dim)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self.head.encode(mean_pooled(*self._base, texts))

    def loss(self, records: Sequence[TrainRecord]) -> tuple[torch.Tensor, dict[str, float]]:
        """Every record's edit question is a key; its paraphrase and its translations are positive questions for it
        and negatives for the other keys of the batch; its unrelated (locality) question is negative for all keys."""
        keys = self.encode([r.src for r in records])
        questions, owners = [], []
        for i, r in enumerate(records):
            for q in (r.rephrase, *r.translations):
                questions.append(q)
                owners.append(i)
        questions += [r.loc for r in records]
        owners += [-1] * len(records)
        logits = self.head.logits(self.encode(questions), keys)
        labels = (torch.tensor(owners)[:, None] == torch.arange(len(records))[None, :]).float().to(logits.device)
        loss = balanced_bce(logits, labels)
        return loss, {"pos_p": logits.detach()[labels > 0].sigmoid().mean().item()}

    @torch.no_grad()
    def validate(self, records: Sequence[TrainRecord]) -> dict[str, float]:
        """With all held-out edits in memory: how often a paraphrase (and a translation) retrieves its own edit above
        p 0.5, and how often an unrelated question is out of scope of every edit."""
        keys = self.encode([r.src for r in records])
        own = torch.arange(len(records))
        result = {}
        for name, texts in (("val_rephrase", [r.rephrase for r in records]), ("val_loc_out", [r.loc for r in records])):
            logits = self.head.logits(self.encode(texts), keys)
            best = logits.max(1)
            if name == "val_loc_out":
                result[name] = float((best.values < 0).float().mean())
            else:
                result[name] = float(((best.values > 0) & (best.indices == own)).float().mean())
        with_translation = [(i, r.translations[0]) for i, r in enumerate(records) if r.translations]
        if with_translation:
            logits = self.head.logits(self.encode([t for _, t in with_translation]), keys)
            best = logits.max(1)
            own = torch.tensor([i for i, _ in with_translation])
            result["val_translation"] = float(((best.values > 0) & (best.indices == own)).float().mean())
        return result


class SeracEditor(Editor):
    """SERAC: edit memory + scope classifier (trained) + counterfactual model (the base model given the edit)."""

    name = "serac"
    hparams_class = SeracHyperParams
    supports_batch = True
    train_hparams_class = SeracTrainHyperParams
    train_family_defaults: dict = {}

    def __init__(self) -> None:
        self._trained = LoadedTrainables(type(self), "scope classifier")
        self._memory = EditsInForce()  # kept with each edit: its requests' prompts encoded by the classifier

    @classmethod
    def make_trainable(cls, model, tokenizer, hp: SeracTrainHyperParams) -> ScopeClassifier:
        return ScopeClassifier(model, tokenizer, hp).to(next(model.parameters()).device)

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Remember the requests; the transform routes in-scope questions to the counterfactual prompt.

        The newest SERAC edit in force retrieves over the whole memory (sequential mode); older edits' transforms
        pass the prompt through while a newer one is in force, so a question gets one retrieved edit. A transform
        keeps its memory as it was when applied, so it still answers after ``restore`` (the deferred vLLM path).
        """
        hp = self.check_hparams(hparams)
        classifier = self.classifier(model, tokenizer, hp)
        snapshot = self._memory.add(model, requests, classifier.encode([r.prompt for r in requests]))
        entry = snapshot[-1]
        layout = chat_layout(tokenizer)
        requests_in_memory = [r for e in snapshot for r in e.requests]
        keys = torch.cat([e.kept for e in snapshot])

        def transform(prompt: str) -> str:
            if entry.superseded():
                return prompt  # a newer SERAC edit retrieves over this one too
            start = layout.content_start(prompt) if layout else None
            question = prompt if start is None else prompt[start:]
            with torch.no_grad():
                p = classifier.head.logits(classifier.encode([question]), keys)[0].sigmoid()
            best = int(p.argmax())
            if float(p[best]) <= hp.scope_threshold:
                return prompt  # out of scope: the base model answers unchanged
            edit = requests_in_memory[best]
            context = hp.counterfactual_template.format(prompt=edit.prompt, target=edit.target_new)
            return insert_context(prompt, context, layout)

        info = {"method": self.name, "memory_size": len(requests_in_memory)}
        return AppliedEdit(restore=entry.withdraw, prompt_transform=transform, info=info)

    def check_hparams(self, hparams: HyperParams) -> SeracHyperParams:
        self.typed_hparams(hparams)
        if not 0.0 <= hparams.scope_threshold < 1.0:
            raise EditorError(f"scope_threshold must be in [0, 1), got {hparams.scope_threshold}")
        try:
            hparams.counterfactual_template.format(prompt="", target="")
        except (KeyError, IndexError, ValueError) as err:
            raise EditorError(
                f"counterfactual_template may only use {{prompt}} and {{target}}: {err!r} in "
                f"{hparams.counterfactual_template!r}"
            ) from None
        return hparams

    def classifier(self, model, tokenizer, hp: SeracHyperParams) -> ScopeClassifier:
        return self._trained.get(model, tokenizer, hp.editor_checkpoint)


__all__ = ["SeracEditor", "SeracHyperParams", "SeracTrainHyperParams"]
