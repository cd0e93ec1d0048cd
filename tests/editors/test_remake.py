"""ReMaKE: the scope decision (retrieval over the edits in force, calibrated threshold), the prompt (zero, few,
few-bi demonstrations from aligned pools), the retrieval report, and the path through the xke model.

A random tiny model embeds nothing meaningfully, so the routing tests give the editor a small character-count
encoder with a known geometry; the model's own encoder (PromptEOL) is checked for what it must guarantee whatever
the model (unit vectors, independent of the batch a text is padded in).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm_eval_xke.backends.hf import HFBackend
from lm_eval_xke.cases import EditCase, EditRequest, Question
from lm_eval_xke.editors import EditorError
from lm_eval_xke.model import XKELM
from lm_eval_xke.plugins.ike.pool import DemoPool
from lm_eval_xke.plugins.remake import RemakeEditor
from lm_eval_xke.plugins.remake.compute import retrieve_demonstrations
from lm_eval_xke.plugins.remake.retriever import PromptEolEncoder, best_threshold, calibrate, calibration_texts
from lm_eval_xke.testing import CHAT_TEMPLATE, byte_level_tokenizer, loglikelihood_requests

pytestmark = pytest.mark.usefixtures("one_thread")

EDIT = EditRequest("Who founded Acme?", "Acme", "Zed", "en")
OTHER = EditRequest("Where is Mount Oro?", "Mount Oro", "Peru", "en")
CONTEXT = "Question: Who founded Acme? Answer: Zed\n"  # the retrieved edit, as one more question-answer pair


def asked(text: str) -> str:
    """A bare question as ReMaKE asks it."""
    return f"Question: {text} Answer:"


class CharCounts:
    """Bag of letters: restatements that share most letters are near, unrelated questions far."""

    description = "letter counts, cosine"

    def encode(self, texts):
        rows = [[Counter(t.lower())[c] for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts]
        return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


class Model:
    """Stands in for the model: ReMaKE keeps its edits in force per model object."""


@pytest.fixture
def pool_dir(tmp_path):
    """An aligned en/de pool of three facts; line 3 has no German answer (as 35 lines of the real pools)."""
    (tmp_path / "zsre_mend_train_en_10000.txt").write_text(
        "Who founded Acme Ltd?\tBob\nWhere is Lake Ux?\tChile\nWhat is Qi?\tTea\n", encoding="utf-8"
    )
    (tmp_path / "zsre_mend_train_de_10000.txt").write_text(
        "Wer gründete Acme Ltd?\tBob\nWo liegt der Ux-See?\tChile\nWas ist Qi?\n", encoding="utf-8"
    )
    return tmp_path


def editor_with(encoder=None) -> RemakeEditor:
    editor = RemakeEditor()
    editor.encoder = lambda model, tokenizer, hp: encoder or CharCounts()
    return editor


def hparams(**overrides):
    return RemakeEditor().resolve_hparams("llama", overrides={"demos": "zero", "scope_threshold": 0.95, **overrides})


def question(prompt: str, role: str = "reliability", lang: str = "en", phase: str = "post") -> Question:
    return Question(role, lang, prompt, ("x",), phase=phase)


# ---------------------------------------------------------------- scope


def test_in_scope_questions_get_the_edit_and_unrelated_ones_pass_unchanged():
    editor = editor_with()
    edit = editor.apply(Model(), None, [EDIT], hparams())
    assert edit.rewrite("Who founded Acme?", question("Who founded Acme?")) == CONTEXT + asked("Who founded Acme?")
    assert edit.rewrite("Acme: who founded it?", question("Acme: who founded it?", "generality")) == (
        CONTEXT + asked("Acme: who founded it?")
    )
    assert edit.rewrite("Why is grass green?", question("Why is grass green?", "locality")) == "Why is grass green?"
    edit.rewrite("Who founded Acme?", question("Who founded Acme?", phase="final"))  # not counted: owner unknown
    retrieval = editor.report()["retrieval"]["en"]
    assert retrieval == {
        "in_scope": 2,
        "found": 2,
        "wrong_edit": 0,
        "out_of_scope": 1,
        "rejected": 1,
        "found_rate": 1.0,
        "rejected_rate": 1.0,
    }


def test_the_nearest_edit_of_a_batch_is_retrieved_and_a_wrong_one_is_counted():
    editor = editor_with()
    edit = editor.apply(Model(), None, [EDIT, OTHER], hparams())
    oro = "Where is Mount Oro?"
    assert edit.rewrite(oro, question(oro)) == "Question: Where is Mount Oro? Answer: Peru\n" + asked(oro)
    editor = editor_with()
    model = Model()
    editor.apply(model, None, [OTHER], hparams())
    second = editor.apply(model, None, [EDIT], hparams())
    second.rewrite(oro, question(oro))  # a post question of EDIT's case that retrieves OTHER
    assert editor.report()["retrieval"]["en"]["wrong_edit"] == 1


def test_sequential_edits_retrieve_over_the_memory_once_and_survive_restore():
    editor, model = editor_with(), Model()
    first = editor.apply(model, None, [EDIT], hparams())
    second = editor.apply(model, None, [OTHER], hparams())
    acme = "Who founded Acme?"
    assert first.rewrite(acme, question(acme)) == acme  # the newer edit retrieves over both
    assert second.rewrite(acme, question(acme)) == CONTEXT + asked(acme)
    second.restore()
    assert first.rewrite(acme, question(acme)) == CONTEXT + asked(acme)
    first.restore()
    assert second.rewrite(acme, question(acme)) == CONTEXT + asked(acme)  # the deferred (vLLM) path asks after restore
    assert second.info["memory_size"] == 2


def test_the_question_is_asked_where_and_as_the_task_renders_it():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    edit = editor_with().apply(Model(), tokenizer, [EDIT], hparams())
    acme = question("Who founded Acme?")
    generation = "Question: Who founded Acme?\nAnswer:"  # the _gen tasks already ask in this form: kept
    assert edit.rewrite(generation, acme) == CONTEXT + generation
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who founded Acme?"}], tokenize=False, add_generation_prompt=True
    )
    assert edit.rewrite(rendered, acme) == f"<|user|>{CONTEXT}{asked('Who founded Acme?')}\n<|assistant|>"
    assert edit.rewrite("Re-worded: who founded Acme", acme) == CONTEXT + "Re-worded: who founded Acme"


def test_best_threshold_separates_and_prefers_the_lowest_of_equals():
    threshold, found, rejected = best_threshold(np.array([0.9, 0.8]), np.array([0.1, 0.5]))
    assert (threshold, found, rejected) == (pytest.approx(0.65), 1.0, 1.0)
    threshold, found, rejected = best_threshold(np.array([0.9, 0.4]), np.array([0.1, 0.5]))
    assert threshold == pytest.approx(0.25) and (found, rejected) == (1.0, 0.5)  # 0.7 ties: (0.5, 1.0)


def test_calibration_pairs_each_question_with_its_translations(pool_dir):
    pool = DemoPool.load(
        [("en", pool_dir / "zsre_mend_train_en_10000.txt"), ("de", pool_dir / "zsre_mend_train_de_10000.txt")]
    )
    assert pool.unpaired == {f"de:{pool_dir / 'zsre_mend_train_de_10000.txt'}": 1}
    records = calibration_texts(pool, "en", 10, seed=0)
    assert sorted(records) == [
        ("Where is Lake Ux?", ["Wo liegt der Ux-See?"]),
        ("Who founded Acme Ltd?", ["Wer gründete Acme Ltd?"]),
    ]
    calibration = calibrate(CharCounts(), records)
    assert calibration.pairs == 2 and calibration.in_scope_found + calibration.out_of_scope_rejected == 2.0
    with pytest.raises(EditorError, match="fewer than 2 de questions with a translation"):
        calibration_texts(DemoPool.load([("de", pool_dir / "zsre_mend_train_de_10000.txt")]), "de", 10, seed=0)


def test_calibrated_threshold_is_used_and_reported(pool_dir):
    editor = editor_with()
    edit = editor.apply(Model(), None, [EDIT], hparams(scope_threshold=None, pool_dir=str(pool_dir)))
    calibration = edit.info["calibration"]
    assert edit.info["scope_threshold"] == pytest.approx(calibration["threshold"], abs=1e-6)
    assert calibration["pairs_per_class"] == 2
    assert editor.report()["calibrations"] == [calibration]


# ---------------------------------------------------------------- demonstrations


def test_demonstrations_zero_few_and_few_bi(pool_dir):
    pool = DemoPool.load(
        [("en", pool_dir / "zsre_mend_train_en_10000.txt"), ("de", pool_dir / "zsre_mend_train_de_10000.txt")]
    )
    edit = EditRequest("Who founded Acme?", "Acme", "Zed", "en")
    assert retrieve_demonstrations(pool, edit, "de", "zero", 2) == []
    assert retrieve_demonstrations(pool, edit, "de", "few", 1) == ["Question: Wer gründete Acme Ltd? Answer: Bob\n\n"]
    assert retrieve_demonstrations(pool, edit, "de", "few-bi", 1) == [
        "Question: Who founded Acme Ltd? Answer: Bob\nQuestion: Wer gründete Acme Ltd? Answer: Bob\n\n"
    ]
    tea = EditRequest("What is Qi?", "Qi", "Tea", "en")  # no German answer: shown in English only
    assert retrieve_demonstrations(pool, tea, "de", "few-bi", 1) == ["Question: What is Qi? Answer: Tea\n\n"]
    assert retrieve_demonstrations(pool, edit, "en", "few-bi", 1) == ["Question: Who founded Acme Ltd? Answer: Bob\n\n"]


def test_demonstrations_follow_the_questions_language(pool_dir):
    editor = editor_with()
    edit = editor.apply(
        Model(), None, [EDIT], hparams(demos="few-bi", k=1, pool_dir=str(pool_dir), scope_threshold=0.5)
    )
    wer = "Wer gründete Acme?"
    german = "Question: Who founded Acme Ltd? Answer: Bob\nQuestion: Wer gründete Acme Ltd? Answer: Bob\n\n"
    assert edit.rewrite(wer, question(wer, lang="de")) == german + CONTEXT + asked(wer)


# ---------------------------------------------------------------- settings, encoders, the xke model


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"demos": "two"}, r"demos must be one of zero, few, few-bi, got 'two'"),
        ({"k": -1}, r"k must be >= 0"),
        ({"scope_threshold": 2.0}, r"scope_threshold is a cosine in \[-1, 1\]"),
        ({"calibration_records": 1}, r"calibration_records must be >= 2"),
        ({"pool_dir": "/no/such/folder", "demos": "few"}, r"pool_dir /no/such/folder holds no zsre_mend_train"),
    ],
)
def test_bad_hparams_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(EditorError, match=message):
        editor_with().apply(Model(), None, [EDIT], hparams(**overrides))


def test_retriever_names_are_checked(tiny):
    model, tokenizer = tiny
    with pytest.raises(EditorError, match="retriever must be 'model' or 'sentence-transformers:NAME', got 'bert'"):
        RemakeEditor().apply(model, tokenizer, [EDIT], hparams(retriever="bert"))
    with pytest.raises(EditorError, match=r"sentence-transformers:/no/model"):
        RemakeEditor().apply(model, tokenizer, [EDIT], hparams(retriever="sentence-transformers:/no/model"))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from lm_eval_xke.testing import load_tiny

    return load_tiny(tiny_llama_dir)


def test_prompt_eol_vectors_are_unit_and_independent_of_the_batch(tiny):
    encoder = PromptEolEncoder(*tiny, embed_layer=None)
    alone = encoder.encode(["Who founded Acme?"])
    padded = encoder.encode(["Who founded Acme?", "A much longer question about Mount Oro, in Peru?"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert torch.allclose(padded.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(padded[0], padded[1])
    assert "final normalised hidden state" in encoder.description
    assert "output of block 1" in PromptEolEncoder(*tiny, embed_layer=1).description


def test_questions_reach_the_editor_with_their_language_and_the_report_reaches_the_results(
    tiny_llama_dir, pool_dir, monkeypatch
):
    contexts: list[str] = []
    readout = HFBackend.readout

    def recording(self, pairs):
        contexts.extend(context for context, _ in pairs)
        return readout(self, pairs)

    monkeypatch.setattr(HFBackend, "readout", recording)
    lm = XKELM(
        pretrained=str(tiny_llama_dir),
        device="cpu",
        editor="remake",
        scope_threshold=-1.0,  # every question in scope
        demos="few",
        k=1,
        pool_dir=str(pool_dir),
        journal="off",
    )
    weights = {n: p.clone() for n, p in lm.backend.model.state_dict().items()}
    case = EditCase(
        case_id="c",
        requests=(EDIT,),
        questions=(
            Question("locality", "en", "Why is grass green?", ("x",), phase="pre"),
            Question("reliability", "en", EDIT.prompt, ("Zed",)),
            Question("reliability", "de", "Wer gründete Acme?", ("Zed",)),
        ),
    )
    lm.loglikelihood(loglikelihood_requests({"xke": case.to_doc()}, 0))
    assert contexts == [
        "Why is grass green?",
        "Question: Who founded Acme Ltd? Answer: Bob\n\n" + CONTEXT + asked(EDIT.prompt),
        "Question: Wer gründete Acme Ltd? Answer: Bob\n\n" + CONTEXT + asked("Wer gründete Acme?"),
    ]
    assert all(torch.equal(t, weights[n]) for n, t in lm.backend.model.state_dict().items())
    report = lm.get_model_info()["xke"]["editor_report"]["retrieval"]
    assert {lang: row["found"] for lang, row in report.items()} == {"en": 1, "de": 1}
