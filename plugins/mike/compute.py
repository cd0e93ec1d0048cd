"""MIKE's prompt (BMIKE-53, Nie et al. 2025, arXiv 2406.17764): BMIKE-53's manual demonstrations, which of them,
in which language, and the new fact.

The demonstrations come from the authors' ``data/manual_prompts/`` files: 32 per dataset, in four types (copy,
update, retain, portability; the file repeats the block ``c u u u r r p p`` four times). Each is written as in the
authors' code (``shaobo9856/IKE``, ``manual/icl.py``), stray spaces included::

    New Fact: {new_fact} \\nPrompt: {prompt} \\n\\n

``new_fact`` is always English. ``prompt`` is the English ``prompt`` field (the monolingual set, ``demo_lang=en``)
or its translation from the ``*_multi.json`` file (the cross-lingual set): one machine-translated string of the
English ``prompt``, question and answer together (zsRE's often without a space between them, as
``...gekämpft?Erster Weltkrieg``), used whole as the authors do. The question follows as
``New Fact: {edit prompt} {target}\\nPrompt: {question}``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.data import DataFile, DataNotFoundError, locate
from lm_eval_xke.editors import EditorError

TYPES = ("copy", "update", "retain", "portability")
#: dataset name (as in the ``bmike53_<dataset>_<lang>`` tasks) -> the manual prompt file's stem
DATASET_FILES = {"zsre": "zsre", "counterfact": "mcounterfact", "wfd": "wfd"}
#: harness language codes that the ``*_multi.json`` files spell differently
FILE_LANG = {"zh": "zh-cn"}
_URL = "https://raw.githubusercontent.com/ercong21/MultiKnow/6e3e245bf0a17edaecfb4d71664efc1b5fb67906/data/"
# fmt: off
MANUAL_SHA256 = {
    "zsre.json": "5faaab5177872f6e0ecaf15afa7c7ce2f1220697484a749e074c87f3b3b69363",
    "zsre_multi.json": "cce8ee87aa33074568844fb4f1fbd6936b8cb843c0b5b90e92ffa9843220e401",
    "mcounterfact.json": "594b980656b29bed7f08729b5ec0773c480e575f8bdb0add6c257b9fa0cb2b5f",
    "mcounterfact_multi.json": "86536d909b833cec52803a3d903470c9b422d97cc13aa69848b2c525bd112d85",
    "wfd.json": "ad1daf269e84921090bb7bdd66b82025f444b17e0837964a201edd058f1281ba",
    "wfd_multi.json": "3dba24135d81780ab3375de5c63bbd211979d0ac2908ba1d4894ab877e4cea8a",
}
# fmt: on


@dataclass(frozen=True)
class Demo:
    """One manual demonstration: its id in the file, type, English new fact and (possibly translated) prompt."""

    id: int
    type: str
    new_fact: str
    prompt: str


def manual_file(name: str) -> DataFile:
    """The pinned manual prompt file ``name`` (e.g. ``zsre_multi.json``), from the commit the tasks pin."""
    return DataFile(f"bmike53/manual_prompts/{name}", sha256=MANUAL_SHA256[name], url=f"{_URL}manual_prompts/{name}")


def file_lang(lang: str) -> str:
    return FILE_LANG.get(lang, lang)


def load_demos(dataset: str, lang: str) -> list[Demo]:
    """The 32 demonstrations of ``dataset`` with prompts in ``lang`` (``en``: the English file), in file order."""
    return list(_cached_demos(dataset, file_lang(lang)))


@lru_cache(maxsize=8)
def _cached_demos(dataset: str, lang: str) -> tuple[Demo, ...]:
    stem = DATASET_FILES[dataset]
    english = [_english_demo(item, f"{stem}.json", i) for i, item in enumerate(_read(f"{stem}.json"))]
    if lang == "en":
        return tuple(english)
    multi = _read(f"{stem}_multi.json")
    if len(multi) != len(english):
        raise EditorError(f"{stem}_multi.json has {len(multi)} demonstrations, {stem}.json {len(english)}")
    demos = []
    for demo, item in zip(english, multi, strict=True):
        # the translations are keyed by the English file's order: check that the two files describe the same item
        if not isinstance(item, dict) or (item.get("case_id"), item.get("new_fact")) != (demo.id, demo.new_fact):
            raise EditorError(f"{stem}_multi.json and {stem}.json disagree at demonstration {demo.id}")
        translated = item.get(lang)
        if not isinstance(translated, str) or not translated.strip():
            raise EditorError(f"{stem}_multi.json has no {lang!r} translation of demonstration {demo.id}")
        demos.append(Demo(demo.id, demo.type, demo.new_fact, translated))
    return tuple(demos)


def _read(name: str) -> list:
    try:
        path: Path = locate(manual_file(name))
    except DataNotFoundError as err:
        raise EditorError(f"MIKE's manual demonstrations are missing: {err}\nOr use shots=0 (none).") from None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise EditorError(f"{path} must hold a JSON list of demonstrations")
    return data


def _english_demo(item: object, name: str, index: int) -> Demo:
    block = item.get("en") if isinstance(item, dict) else None
    fields = ("id", "type", "new_fact", "prompt")
    if not isinstance(block, dict) or any(key not in block for key in fields) or block["type"] not in TYPES:
        raise EditorError(f"{name}, item {index}: expected {{'en': {{id, type, new_fact, prompt}}}}, got {item!r}")
    return Demo(int(block["id"]), block["type"], block["new_fact"], block["prompt"])


def available(demos: Sequence[Demo], types: Sequence[str]) -> int:
    return sum(d.type in types for d in demos)


def select_demos(demos: Sequence[Demo], shots: int, types: Sequence[str], seed: int) -> list[Demo]:
    """``shots`` demonstrations taken in turn from each of ``types`` (file order within a type), then shuffled.

    With the four types this is the authors' choice: 8 shots are the first two of each type (their final code) and
    1 shot the file's first, a copy demonstration. The order is shuffled once with ``seed`` (the authors shuffle
    unseeded), so every edit of a run sees the same demonstrations in the same order, as theirs does.
    """
    by_type = [[d for d in demos if d.type == t] for t in types]
    chosen: list[Demo] = []
    for rank in range(max((len(group) for group in by_type), default=0)):
        chosen += [group[rank] for group in by_type if rank < len(group)]
    chosen = chosen[:shots]
    random.Random(seed).shuffle(chosen)
    return chosen


def demonstration(demo: Demo) -> str:
    # the spaces before the newlines are the authors' (``f"New Fact: {x} \nPrompt: {y} \n\n"``)
    return f"New Fact: {demo.new_fact} \nPrompt: {demo.prompt} \n\n"


def mike_context(demos: Sequence[Demo], requests: Sequence[EditRequest]) -> str:
    """Everything MIKE puts before a question: the demonstrations, ``"New Fact: {prompt} {target}"`` for each new
    fact, then ``"Prompt: "``, which the question completes."""
    facts = "".join(f"New Fact: {r.prompt} {r.target_new}\n" for r in requests)
    return "".join(demonstration(d) for d in demos) + facts + "Prompt: "
