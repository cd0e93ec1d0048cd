"""IKE, in-context knowledge editing (Zheng et al. 2023, arXiv 2305.12740): the new fact and retrieved
demonstrations are put in the prompt; no weight changes.

``pool.py`` reads the demonstration pool and retrieves from it; ``compute.py`` builds the demonstrations and the
context, and places it in chat-rendered prompts. The edits in force are kept in ``lm_eval_xke.editing.in_force``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.editing.in_context import chat_layout, insert_context
from lm_eval_xke.editing.in_force import EditsInForce
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams

from .compute import ike_context, retrieve_demonstrations
from .config import IkeHyperParams
from .pool import DemoPool, default_entries, load_pool, parse_entry

log = logging.getLogger("lm_eval.models.xke.ike")


class IkeEditor(Editor):
    """Rewrites every post-edit question as IKE's context followed by the question."""

    name = "ike"
    hparams_class = IkeHyperParams
    supports_batch = True

    def __init__(self) -> None:
        self._in_force = EditsInForce()  # kept with each edit: each request's demonstrations, nearest first
        self._fallbacks_told: set[str] = set()

    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Retrieve the demonstrations; the returned transform writes the context of this edit and of every IKE edit
        that was in force when it was applied (it keeps working after ``restore``, as the deferred vLLM path needs).

        With several edits in force (``edit_mode=sequential``) the newest one's transform writes the context of all
        of them (every new fact, and k demonstrations drawn from all their retrievals); the older ones' transforms
        pass the prompt through while a newer IKE edit is in force, so each fact appears once.
        """
        hp = self.check_hparams(hparams)
        pool = self.pool(hp) if hp.k > 0 else None
        ranked = [self.demonstrations(pool, r, hp) for r in requests] if pool else [[] for _ in requests]
        in_force = self._in_force.add(model, requests, ranked)
        entry = in_force[-1]
        context = ike_context(
            [r for e in in_force for r in e.requests], [demos for e in in_force for demos in e.kept], hp.k
        )
        layout = chat_layout(tokenizer)

        def transform(prompt: str) -> str:
            if entry.superseded():
                return prompt  # a newer IKE edit writes the context of this one too
            return insert_context(prompt, context, layout)

        info = {
            "method": self.name,
            "demonstrations": [len(demos) for demos in ranked],
            "pool": pool.sources if pool else [],
            "chat_template_marker": layout.opener if layout else None,
        }
        return AppliedEdit(restore=entry.withdraw, prompt_transform=transform, info=info)

    def check_hparams(self, hparams: HyperParams) -> IkeHyperParams:
        """Reject settings that cannot work, naming the fix."""
        self.typed_hparams(hparams)
        if hparams.k < 0:
            raise EditorError(f"k must be >= 0 (0: no retrieved demonstrations), got {hparams.k}")
        ratio = hparams.demo_ratio
        if len(ratio) != 3 or any(r < 0 for r in ratio) or sum(ratio) == 0:
            raise EditorError(
                f"demo_ratio must be three non-negative counts copy|update|retain, not all 0 (e.g. 1|3|4), got {ratio}"
            )
        for entry in hparams.demo_pool:
            parse_entry(entry)
        return hparams

    def pool(self, hp: IkeHyperParams) -> DemoPool:
        return load_pool([parse_entry(e) for e in hp.demo_pool] if hp.demo_pool else default_entries())

    def demonstrations(self, pool: DemoPool, request: EditRequest, hp: IkeHyperParams) -> list[str]:
        lang = request.lang
        if lang not in pool.langs:
            lang = "en" if "en" in pool.langs else pool.langs[0]
            if request.lang not in self._fallbacks_told:
                self._fallbacks_told.add(request.lang)
                log.warning("IKE: the pool has no %s facts (only %s); using %s ones", request.lang, pool.langs, lang)
        return retrieve_demonstrations(pool, request, lang, hp.k, hp.demo_ratio, hp.cross_lingual, hp.order_seed)


__all__ = ["IkeEditor", "IkeHyperParams"]
