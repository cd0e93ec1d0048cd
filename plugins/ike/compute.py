"""IKE's prompt (Zheng et al. 2023, arXiv 2305.12740): demonstrations and the new facts, put before the question.

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

from lm_eval_xke.cases import EditRequest

from .pool import DemoPool, PoolFact

COPY, UPDATE, RETAIN = range(3)


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
