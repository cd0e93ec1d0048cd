"""MIKE, multilingual in-context knowledge editing as run by BMIKE-53 (Nie et al., ACL 2025 Findings, arXiv
2406.17764): BMIKE-53's fixed, typed manual demonstrations and the new fact are put in the prompt; no weight changes.

An IKE-family method: it reuses IKE's chat-template placement, and keeps its edits in force as every prompt
editor does (``lm_eval_xke.editing.in_force``). ``compute`` reads the demonstrations and builds the context.
"""

from __future__ import annotations

from collections.abc import Sequence

from lm_eval_xke.cases import EditRequest, Question
from lm_eval_xke.editing.in_context import chat_layout, insert_context
from lm_eval_xke.editing.in_force import EditsInForce
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams
from lm_eval_xke.parallel_data import BMIKE53_LANGS

from .compute import DATASET_FILES, FILE_LANG, TYPES, Demo, available, load_demos, mike_context, select_demos
from .config import QUESTION_LANG, MikeHyperParams


class MikeEditor(Editor):
    """Rewrites every post-edit question as BMIKE-53's demonstrations, the new fact, then the question."""

    name = "mike"
    hparams_class = MikeHyperParams
    supports_batch = True

    def __init__(self) -> None:
        self._in_force = EditsInForce()

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Choose the demonstrations; the returned transform writes them and the new fact of this edit and of every
        MIKE edit in force when it was applied (it keeps working after ``restore``, as the deferred vLLM path needs).

        With several edits in force (``edit_mode=sequential``) the newest one's transform writes the context of all
        of them (its demonstrations once, then every new fact); the older ones' transforms pass the prompt through
        while a newer MIKE edit is in force, so each fact appears once.
        """
        hp = self.check_hparams(hparams)
        in_force = self._in_force.add(model, requests)
        entry = in_force[-1]
        facts = [r for e in in_force for r in e.requests]
        layout = chat_layout(tokenizer)
        first = self.demo_lang(hp.demo_lang)  # read now: a missing file fails the edit, not a question
        demos = self.demonstrations(hp, first)
        contexts = {first: mike_context(demos, facts)}

        def transform(prompt: str, question: Question) -> str:
            if entry.superseded():
                return prompt  # a newer MIKE edit writes the context of this one too
            lang = self.demo_lang(hp.demo_lang, question.lang)
            if lang not in contexts:
                contexts[lang] = mike_context(self.demonstrations(hp, lang), facts)
            return insert_context(prompt, contexts[lang], layout)

        info = {
            "method": self.name,
            "dataset": hp.dataset,
            "demo_lang": hp.demo_lang,
            "demonstrations": [d.id for d in demos],
            "chat_template_marker": layout.opener if layout else None,
        }
        return AppliedEdit(restore=entry.withdraw, question_transform=transform, info=info)

    @staticmethod
    def demo_lang(setting: str, question_lang: str = "en") -> str:
        """The language of the demonstrations' prompts: the setting, or with ``question`` the question's language
        when BMIKE-53 has it (else English)."""
        if setting != QUESTION_LANG:
            return setting
        return question_lang if question_lang in set(BMIKE53_LANGS) | set(FILE_LANG.values()) else "en"

    def demonstrations(self, hp: MikeHyperParams, lang: str) -> list[Demo]:
        if hp.shots == 0:
            return []  # no file needed
        demos = load_demos(hp.dataset, lang)
        most = available(demos, hp.demo_types)
        if hp.shots > most:
            raise EditorError(
                f"shots={hp.shots} but the {hp.dataset} manual file has {most} demonstrations of type(s) "
                f"{'|'.join(hp.demo_types)}: lower shots (the paper runs 0, 1 and 8) or add demo_types"
            )
        return select_demos(demos, hp.shots, hp.demo_types, hp.order_seed)

    def check_hparams(self, hparams: HyperParams) -> MikeHyperParams:
        """Reject settings that cannot work, naming the field and the fix."""
        self.typed_hparams(hparams)
        if hparams.dataset not in DATASET_FILES:
            raise EditorError(
                f"dataset must be one of {' | '.join(DATASET_FILES)} (the task's BMIKE-53 dataset), got "
                f"{hparams.dataset!r}"
            )
        if hparams.shots < 0:
            raise EditorError(f"shots must be >= 0 (the paper runs 0, 1 and 8), got {hparams.shots}")
        langs = sorted(set(BMIKE53_LANGS) | set(FILE_LANG.values()))
        if hparams.demo_lang not in [*langs, QUESTION_LANG]:
            raise EditorError(
                f"demo_lang must be en (English demonstrations), a BMIKE-53 language code such as de or zh (the "
                f"task's test language) or {QUESTION_LANG} (each question's own), got {hparams.demo_lang!r}; codes: "
                f"{', '.join(langs)}"
            )
        bad = [t for t in hparams.demo_types if t not in TYPES]
        if bad or len(set(hparams.demo_types)) != len(hparams.demo_types) or not hparams.demo_types:
            raise EditorError(
                f"demo_types must be distinct types from {'|'.join(TYPES)} (e.g. portability), got "
                f"{'|'.join(hparams.demo_types) or 'none'}"
            )
        return hparams


__all__ = ["MikeEditor", "MikeHyperParams"]
