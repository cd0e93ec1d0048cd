"""IKE's prompt (Zheng et al. 2023, arXiv 2305.12740): demonstrations, the new facts, and where they go.

Each demonstration pairs a training fact with a prompt, in the paper's format
``"New Fact: {question} {answer}\\nPrompt: {prompt} {completion}\\n\\n"``, of one of three kinds:

- copy: the prompt is the fact itself (the model learns to repeat a new fact);
- update: a paraphrase of the fact's question, completed with the fact's answer (the edit generalises);
- retain: an unrelated question completed with its own answer (the edit stays local).

As in the paper's code, the kinds are shuffled in the proportions ``demo_ratio`` and given to the retrieved facts
nearest first; the demonstrations are then reversed (nearest last, next to the question), followed by a copy
demonstration of each edited fact and, for every question, ``"New Fact: {prompt} {target}\\nPrompt: "``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2

from lm_eval_xke.cases import EditRequest

from .pool import DemoPool, PoolFact

COPY, UPDATE, RETAIN = range(3)
#: Placeholders rendered through the tokenizer's chat template to find where a user turn starts.
USER_PROBE = "\u27e6xke-user\u27e7"
SYSTEM_PROBE = "\u27e6xke-system\u27e7"


def fact_text(request: EditRequest) -> str:
    return f"{request.prompt} {request.target_new}"


def demonstration(fact: str, prompt: str, completion: str) -> str:
    return f"New Fact: {fact}\nPrompt: {prompt} {completion}\n\n"


def demo_kinds(k: int, ratio: Sequence[int], rng: random.Random) -> list[int]:
    """``k`` kinds in the proportions ``ratio`` (copy, update, retain; largest remainders), shuffled."""
    total = sum(ratio)
    exact = [k * r / total for r in ratio]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(ratio)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: k - sum(counts)]:
        counts[i] += 1
    kinds = [kind for kind, count in enumerate(counts) for _ in range(count)]
    rng.shuffle(kinds)
    return kinds


def update_prompts(fact: PoolFact, lang: str, cross_lingual: bool) -> list[tuple[str, str]]:
    """(prompt, completion) pairs that restate ``fact`` differently: its paraphrase, and with ``cross_lingual``
    its question in every other language it has (answered in that language)."""
    prompts = [(fact.paraphrases[lang], fact.answers[lang])] if lang in fact.paraphrases else []
    if cross_lingual:
        prompts += [(fact.questions[other], fact.answers[other]) for other in sorted(fact.answers) if other != lang]
    return prompts


def pool_demonstration(fact: PoolFact, lang: str, kind: int, nth_update: int, cross_lingual: bool) -> str:
    """One demonstration of ``kind`` for a pool fact; a kind the fact cannot give becomes a copy demonstration."""
    new_fact = f"{fact.questions[lang]} {fact.answers[lang]}"
    updates = update_prompts(fact, lang, cross_lingual)
    if kind == UPDATE and updates:
        return demonstration(new_fact, *updates[nth_update % len(updates)])
    if kind == RETAIN and fact.neighbour is not None:
        return demonstration(new_fact, *fact.neighbour)
    return demonstration(new_fact, fact.questions[lang], fact.answers[lang])


def retrieve_demonstrations(
    pool: DemoPool, request: EditRequest, lang: str, k: int, ratio: Sequence[int], cross_lingual: bool, seed: int
) -> list[str]:
    """The ``k`` demonstrations for one edit, built on the pool facts nearest to it in ``lang``, nearest first.

    The order of kinds is shuffled with a generator seeded by ``seed`` and the fact, so it is reproducible and
    independent of the other edits of the run.
    """
    nearest = pool.nearest(lang, fact_text(request), k)
    kinds = demo_kinds(len(nearest), ratio, random.Random(f"{seed}|{request.prompt}|{request.target_new}"))
    demos = []
    updates = 0  # update demonstrations so far: they cycle through a fact's restatements
    for index, kind in zip(nearest, kinds, strict=True):
        demos.append(pool_demonstration(pool.facts[index], lang, kind, updates, cross_lingual))
        updates += kind == UPDATE
    return demos


def merge_nearest(ranked: Sequence[Sequence[str]], k: int) -> list[str]:
    """Up to ``k`` distinct demonstrations taken in turn from each edit's list (nearest first)."""
    merged: dict[str, None] = {}
    for rank in range(max((len(r) for r in ranked), default=0)):
        for demos in ranked:
            if rank < len(demos) and len(merged) < k:
                merged.setdefault(demos[rank])
    return list(merged)


def ike_context(requests: Sequence[EditRequest], ranked: Sequence[Sequence[str]], k: int) -> str:
    """Everything IKE puts before a question: demonstrations (nearest last), a copy demonstration of each new
    fact, then ``"New Fact: ..."`` for each new fact and ``"Prompt: "``, which the question completes."""
    facts = [fact_text(r) for r in requests]
    demos = list(reversed(merge_nearest(ranked, k)))
    demos += [demonstration(f, r.prompt, r.target_new) for f, r in zip(facts, requests, strict=True)]
    return "".join(demos) + "".join(f"New Fact: {f}\n" for f in facts) + "Prompt: "


# ---------------------------------------------------------------- chat templates


@dataclass(frozen=True)
class ChatLayout:
    """Where a user turn's content starts in prompts rendered with a chat template.

    ``opener`` is the text that precedes the content. ``anchored``: it is the whole template head (system turn
    included), so it is searched at the very start of the prompt; otherwise it is the turn's own marker (e.g.
    ``"<|im_end|>\\n<|im_start|>user\\n"``), searched as the last such marker (the turn with the question).
    """

    opener: str
    anchored: bool

    def content_start(self, prompt: str) -> int | None:
        if self.anchored:
            return len(self.opener) if prompt.startswith(self.opener) else None
        found = prompt.rfind(self.opener)
        return None if found < 0 else found + len(self.opener)


def chat_layout(tokenizer) -> ChatLayout | None:
    """Find how the tokenizer's chat template opens a user turn; None without a (renderable) template.

    The user-turn marker is what the head before the user content has in common whether or not a system turn
    is given (the system turn differs). Templates that refuse a system turn, or where the common part is only
    whitespace (the system text is merged into the user turn), fall back to the whole head, anchored.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        head = _head(tokenizer, [{"role": "user", "content": USER_PROBE}])
    except (jinja2.TemplateError, ValueError, TypeError, KeyError):
        return None
    if head is None:
        return None
    try:
        with_system = _head(
            tokenizer, [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": USER_PROBE}]
        )
    except (jinja2.TemplateError, ValueError, TypeError, KeyError):
        with_system = None
    marker = _common_suffix(head, with_system) if with_system is not None else ""
    if marker.strip():
        return ChatLayout(marker, anchored=False)
    return ChatLayout(head, anchored=True) if head else None


def _head(tokenizer, messages: list[dict]) -> str | None:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    found = text.find(USER_PROBE)
    return None if found < 0 else text[:found]


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


def insert_context(prompt: str, context: str, layout: ChatLayout | None) -> str:
    """``context`` at the start of the user turn of a chat-rendered prompt, else in front of the prompt."""
    start = None if layout is None else layout.content_start(prompt)
    if start is None:
        return context + prompt
    return prompt[:start] + context + prompt[start:]
