"""ReMaKE, retrieval-augmented multilingual knowledge editing (Wang et al. 2023, arXiv 2312.13040): edits go to a
memory; a multilingual retriever decides per question whether an edit is in scope and which one; an in-scope
question is asked after demonstrations and the retrieved edit, an out-of-scope one is asked unchanged.

``retriever.py`` embeds and calibrates the scope threshold; ``compute.py`` builds the prompt from the translated
training pools (read with IKE's pool, the family parent). No weight changes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import torch

from lm_eval_xke.cases import EditRequest, Question
from lm_eval_xke.editing.in_context import chat_layout
from lm_eval_xke.editing.in_force import EditsInForce
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams
from lm_eval_xke.plugins.ike.pool import DemoPool, load_pool

from .compute import ask_in_context, pool_entries, remake_context, retrieve_demonstrations
from .config import DEMO_MODES, RemakeHyperParams
from .retriever import Calibration, Encoder, calibrate, calibration_texts, make_encoder

#: Per question language, how its post-edit questions were retrieved for (``report``).
RETRIEVAL_COUNTS = ("in_scope", "found", "wrong_edit", "out_of_scope", "rejected")


class RemakeEditor(Editor):
    """Retrieves the edit in scope of each question from the edits in force and prompts with it."""

    name = "remake"
    hparams_class = RemakeHyperParams
    supports_batch = True

    def __init__(self) -> None:
        self._memory = EditsInForce()  # kept with each edit: its requests' prompts, embedded
        self._encoders: dict[tuple, Encoder] = {}
        self._calibrations: dict[tuple, Calibration] = {}
        self._retrieved: defaultdict[str, Counter] = defaultdict(Counter)

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Remember the requests; the transform retrieves over every edit in force when it was applied.

        As for SERAC, the newest ReMaKE edit in force retrieves over the whole memory (sequential mode), and the
        older ones' transforms pass the prompt through while it is in force.
        """
        hp = self.check_hparams(hparams)
        encoder = self.encoder(model, tokenizer, hp)
        pool = load_pool(pool_entries(hp.pool_dir)) if hp.demos != "zero" or hp.scope_threshold is None else None
        threshold, calibration = self.threshold(encoder, pool, requests[0].lang, hp)
        snapshot = self._memory.add(model, requests, encoder.encode([r.prompt for r in requests]))
        entry = snapshot[-1]
        memory = [r for e in snapshot for r in e.requests]
        keys = torch.cat([e.kept for e in snapshot])
        own = range(len(memory) - len(requests), len(memory))  # this case's requests: the memory's last ones
        layout = chat_layout(tokenizer)
        demos: dict[tuple[int, str], list[str]] = {}

        def transform(prompt: str, question: Question) -> str:
            if entry.superseded():
                return prompt  # a newer ReMaKE edit retrieves over this one too
            similarity = encoder.encode([question.prompt])[0] @ keys.T
            best = int(similarity.argmax())
            in_scope = float(similarity[best]) >= threshold
            if question.phase == "post":  # asked right after its own case's edit: the right answer is known
                self._count(question, in_scope, best in own)
            if not in_scope:
                return prompt  # out of scope: the model answers as if unedited
            if (best, question.lang) not in demos:
                demos[best, question.lang] = retrieve_demonstrations(pool, memory[best], question.lang, hp.demos, hp.k)
            context = remake_context(memory[best], demos[best, question.lang])
            return ask_in_context(prompt, question.prompt, context, layout)

        info = {
            "method": self.name,
            "memory_size": len(memory),
            "retriever": encoder.description,
            "scope_threshold": threshold,
            **({"calibration": calibration.as_dict()} if calibration else {}),
            "pool": pool.sources if pool else [],
        }
        return AppliedEdit(restore=entry.withdraw, question_transform=transform, info=info)

    def check_hparams(self, hparams: HyperParams) -> RemakeHyperParams:
        """Reject settings that cannot work, naming the fix."""
        self.typed_hparams(hparams)
        if hparams.demos not in DEMO_MODES:
            raise EditorError(f"demos must be one of {', '.join(DEMO_MODES)}, got {hparams.demos!r}")
        if hparams.k < 0:
            raise EditorError(f"k must be >= 0 (0: no demonstrations), got {hparams.k}")
        if hparams.scope_threshold is not None and not -1.0 <= hparams.scope_threshold <= 1.0:
            raise EditorError(
                f"scope_threshold is a cosine in [-1, 1] (or none: calibrated), got {hparams.scope_threshold}"
            )
        if hparams.calibration_records < 2:
            raise EditorError(f"calibration_records must be >= 2, got {hparams.calibration_records}")
        return hparams

    def encoder(self, model, tokenizer, hp: RemakeHyperParams) -> Encoder:
        key = (id(model), hp.retriever, hp.embed_layer)
        if key not in self._encoders:
            self._encoders[key] = make_encoder(hp.retriever, model, tokenizer, hp.embed_layer)
        return self._encoders[key]

    def threshold(
        self, encoder: Encoder, pool: DemoPool | None, edit_lang: str, hp: RemakeHyperParams
    ) -> tuple[float, Calibration | None]:
        """The given threshold, or the one calibrated (once per encoder, pool and edit language)."""
        if hp.scope_threshold is not None:
            return hp.scope_threshold, None
        key_lang = edit_lang if edit_lang in pool.langs else "en"
        key = (encoder.description, tuple(pool.sources), key_lang, hp.calibration_records, hp.seed)
        if key not in self._calibrations:
            records = calibration_texts(pool, key_lang, hp.calibration_records, hp.seed)
            self._calibrations[key] = calibrate(encoder, records)
        calibration = self._calibrations[key]
        return calibration.threshold, calibration

    def _count(self, question: Question, in_scope: bool, own_edit: bool) -> None:
        counts = self._retrieved[question.lang]
        if question.role == "locality":
            counts["out_of_scope"] += 1
            counts["rejected"] += not in_scope
        else:
            counts["in_scope"] += 1
            counts["found"] += in_scope and own_edit
            counts["wrong_edit"] += in_scope and not own_edit

    def report(self) -> dict:
        """Retrieval accuracy per question language over the post-edit questions this process asked: in-scope
        (reliability, generality, portability) questions whose own edit was retrieved, and locality questions that
        got no edit."""
        per_lang = {}
        for lang, counts in sorted(self._retrieved.items()):
            row = {name: counts[name] for name in RETRIEVAL_COUNTS}
            row["found_rate"] = round(counts["found"] / counts["in_scope"], 4) if counts["in_scope"] else None
            row["rejected_rate"] = (
                round(counts["rejected"] / counts["out_of_scope"], 4) if counts["out_of_scope"] else None
            )
            per_lang[lang] = row
        calibrations = [c.as_dict() for c in self._calibrations.values()]
        return {"retrieval": per_lang, "calibrations": calibrations} if per_lang or calibrations else {}


__all__ = ["RemakeEditor", "RemakeHyperParams"]
