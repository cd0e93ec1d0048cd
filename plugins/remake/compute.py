"""ReMaKE's prompt (Wang et al. 2023, arXiv 2312.13040): demonstrations, then the retrieved edit, then the question.

In the authors' code an in-scope question is asked as
``demos + "Question: {edit prompt} Answer: {edit target}\\nQuestion: {question} Answer:"``, the demonstrations
being the k training pairs nearest to the retrieved edit, each in the bilingual ("few-bi") form
``"Question: {q_edit_lang} Answer: {a_edit_lang}\\nQuestion: {q_question_lang} Answer: {a_question_lang}\\n\\n"``.
Here the context goes where the task rendered the question (inside the user turn of a chat template), and a
bare question is asked as ``Question: {question} Answer:``, as the authors ask it (``ask_in_context``).
"""

from __future__ import annotations

from pathlib import Path

from lm_eval_xke.cases import EditRequest
from lm_eval_xke.data import DataFile, DataNotFoundError, locate
from lm_eval_xke.data_pins import REMAKE_POOL_SHA256
from lm_eval_xke.editing.in_context import ChatLayout, insert_context
from lm_eval_xke.editors import EditorError
from lm_eval_xke.parallel_data import MZSRE_REPO_CODES
from lm_eval_xke.plugins.ike.pool import DemoPool, PoolFact

POOL_URL = "https://raw.githubusercontent.com/weixuan-wang123/ReMaKE/975a9e9069/data/"
#: ISO 639-1 code of each pool file's language (the repository writes cz and du for Czech and Dutch).
POOL_LANGS = {code: iso for iso, code in MZSRE_REPO_CODES.items()}


def pool_file(code: str) -> str:
    return f"zsre_mend_train_{code}_10000.txt"


def pool_entries(pool_dir: str | None) -> list[tuple[str, Path]]:
    """(ISO language, path) of every pool file: from ``pool_dir``, or located like the benchmark files and checked
    against the authors' pinned sha256 (English first: it is the language edits are retrieved in)."""
    codes = sorted(REMAKE_POOL_SHA256, key=lambda c: (c != "en", c))
    if pool_dir is not None:
        folder = Path(pool_dir).expanduser()
        found = [(POOL_LANGS.get(c, c), folder / pool_file(c)) for c in codes if (folder / pool_file(c)).is_file()]
        if not found:
            raise EditorError(f"pool_dir {folder} holds no zsre_mend_train_<code>_10000.txt file")
        return found
    try:
        return [
            (
                POOL_LANGS.get(code, code),
                locate(DataFile(f"train/{pool_file(code)}", REMAKE_POOL_SHA256[code], url=POOL_URL + pool_file(code))),
            )
            for code in codes
        ]
    except DataNotFoundError as err:
        raise EditorError(
            f"ReMaKE's demonstration pools are missing: {err}\nOr give pool_dir=<folder>, or demos=zero."
        ) from None


QUESTION = "Question: "


def qa(question: str, answer: str) -> str:
    return f"{QUESTION}{question} Answer: {answer}\n"


def demonstration(fact: PoolFact, edit_lang: str, question_lang: str, mode: str) -> str:
    """One demonstration: ``few`` asks the fact in the question's language; ``few-bi`` in the edit's language, then
    in the question's. A fact without the question's language is shown in the edit's."""
    shown = question_lang if question_lang in fact.answers else edit_lang
    if mode == "few":
        return qa(fact.questions[shown], fact.answers[shown]) + "\n"
    pair = qa(fact.questions[edit_lang], fact.answers[edit_lang])
    if shown != edit_lang:
        pair += qa(fact.questions[shown], fact.answers[shown])
    return pair + "\n"


def retrieve_demonstrations(pool: DemoPool, edit: EditRequest, question_lang: str, mode: str, k: int) -> list[str]:
    """The ``k`` demonstrations built on the pool facts nearest to the edit in its own language, nearest first (as
    the authors' semantic search returns them)."""
    if mode == "zero" or k == 0:
        return []
    edit_lang = edit.lang if edit.lang in pool.langs else "en"
    nearest = pool.nearest(edit_lang, f"{edit.prompt} {edit.target_new}", k)
    return [demonstration(pool.facts[i], edit_lang, question_lang, mode) for i in nearest]


def remake_context(edit: EditRequest, demos: list[str]) -> str:
    """Everything put before an in-scope question: the demonstrations, then the retrieved edit as one more pair."""
    return "".join(demos) + qa(edit.prompt, edit.target_new)


def ask_in_context(prompt: str, question_text: str, context: str, layout: ChatLayout | None) -> str:
    """``prompt`` with ``context`` before the question, asked as the authors ask it (``Question: {q} Answer:``).

    Where the task rendered the question bare (the teacher-forced tasks), it becomes ``Question: {q} Answer:``, so
    the answer being scored follows ``Answer:`` as in every demonstration. A task that already asks
    ``Question: {q}`` (the ``_gen`` tasks) keeps its own wording. A question the rendered prompt does not contain
    verbatim gets the context at the start of the user turn.
    """
    at = prompt.rfind(question_text) if question_text else -1
    if at < 0:
        return insert_context(prompt, context, layout)
    if prompt[:at].endswith(QUESTION):
        at -= len(QUESTION)
        return prompt[:at] + context + prompt[at:]
    end = at + len(question_text)
    return prompt[:at] + context + f"{QUESTION}{question_text} Answer:" + prompt[end:]
