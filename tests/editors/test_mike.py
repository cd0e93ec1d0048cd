"""MIKE: BMIKE-53's manual demonstrations (0, 1 and 8 shots, English and translated), the prompt, chat templates,
batch and sequential edits.

As for IKE, a random tiny model cannot use a context, so these tests check the exact prompt each question is asked
with. The tests that read the manual prompt files skip without ``bmike53/manual_prompts`` in the shared data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm_eval_xke import data
from lm_eval_xke.backends.hf import HFBackend
from lm_eval_xke.cases import EditCase, EditRequest, Question
from lm_eval_xke.data import sha256_of
from lm_eval_xke.editors import EditorError
from lm_eval_xke.model import XKELM
from lm_eval_xke.plugins.mike import MikeEditor
from lm_eval_xke.plugins.mike.compute import MANUAL_SHA256, _cached_demos
from lm_eval_xke.testing import CHAT_TEMPLATE, byte_level_tokenizer, loglikelihood_requests

EDIT = EditRequest("What is the capital of Ruritania?", "Ruritania", "Zenda", "en")
OTHER = EditRequest("Which river flows through Vienna?", "Vienna", "Seine", "en")
FACT = "New Fact: What is the capital of Ruritania? Zenda\n"
ASKED = Question("reliability", "en", "Q?", ("Zenda",))  # the question a transform rewrites (its language matters)

# The English demonstrations of zsre.json that 1 and 8 shots use (id: new_fact, prompt), copied from the file.
ZSRE = {
    1: ("In what war did Jesse Orin Creech fight in? World War I",) * 2,
    2: ("Of what did Earl Hooker die? tuberculosis", "What was Earl Hooker the cause of death? tuberculosis"),
    3: (
        "Who was The Apes of God illustrated by? Wyndham Lewis",
        "What person illustrated The Apes of God? Wyndham Lewis",
    ),
    5: (
        "What position does Malcolm Partridge play? forward",
        "nq question: who dies in batman v superman dawn of justice? Superman",
    ),
    6: (
        "Which is the basis of AIML? XML",
        "nq question: where is the ancient city of ephesus located? Selçuk, İzmir Province, Turkey",
    ),
    7: (
        "What architect designed Toodyay Fire Station? Wyndham Lewis",
        "What art movement is Toodyay Fire Station's architect associated with? Vorticism",
    ),
    8: (
        "Which corporation was USS Leedstown (APA-56) created by? Lockheed Shipbuilding and Engineering Company",
        "What larger corporation was the USS Leedstown (APA-56) builder a part of? Lockheed Corporation",
    ),
    9: ("What country was Augustin-Norbert Morin from? Canada",) * 2,
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


class Model:
    """Stands in for the model: MIKE keeps its edits in force per model object."""


def hparams(**overrides):
    return MikeEditor().resolve_hparams("llama", overrides=overrides)


def apply(requests=(EDIT,), tokenizer=None, **overrides):
    return MikeEditor().apply(Model(), tokenizer, list(requests), hparams(**overrides))


def demo(new_fact: str, prompt: str) -> str:
    return f"New Fact: {new_fact} \nPrompt: {prompt} \n\n"


@pytest.fixture
def manual(data_dir, monkeypatch) -> Path:
    """The shared data folder, as ``XKE_DATA_DIR``, when it has BMIKE-53's manual prompts."""
    folder = data_dir / "bmike53" / "manual_prompts"
    if not (folder / "zsre.json").is_file():
        pytest.skip(f"no BMIKE-53 manual prompts under {data_dir}/bmike53")
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    _cached_demos.cache_clear()
    return folder


# ---------------------------------------------------------------- the prompt


def test_zero_shot_is_the_new_fact_and_needs_no_data(monkeypatch, tmp_path):
    monkeypatch.setenv("XKE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path))
    edit = apply(shots=0)
    assert edit.rewrite("Q?", ASKED) == FACT + "Prompt: Q?"
    assert edit.info["demonstrations"] == []


def test_one_shot_is_the_files_first_copy_demonstration(manual):
    prompt = apply(shots=1).rewrite("Q?", ASKED)
    assert prompt == demo(*ZSRE[1]) + FACT + "Prompt: Q?"


def test_eight_shots_are_two_of_each_type_in_a_seeded_order(manual):
    edit = apply()  # the defaults: 8 shots, all four types, order_seed 0
    order = [9, 2, 3, 5, 1, 7, 8, 6]  # copy 1 9, update 2 3, retain 5 6, portability 7 8, shuffled with seed 0
    assert edit.info["demonstrations"] == order
    assert edit.rewrite("Q?", ASKED) == "".join(demo(*ZSRE[i]) for i in order) + FACT + "Prompt: Q?"
    reseeded = apply(order_seed=1).info["demonstrations"]
    assert sorted(reseeded) == sorted(order) and reseeded != order


def test_cross_lingual_set_has_english_facts_and_translated_prompts(manual):
    german = apply(shots=1, demo_lang="de").rewrite("Q?", ASKED)
    # the translation is of the whole prompt (question and answer, here without a space), used as it is
    translated = "In welchem \u200b\u200bKrieg hat Jesse Orin Creech gekämpft?Erster Weltkrieg"
    assert german == demo(ZSRE[1][0], translated) + FACT + "Prompt: Q?"
    chinese = apply(shots=1, demo_lang="zh").rewrite("Q?", ASKED)  # the harness's zh is the file's zh-cn
    assert chinese.startswith(f"New Fact: {ZSRE[1][0]} \nPrompt: 杰西·奥林·克里奇")


def test_demo_lang_question_gives_each_question_its_own_languages_set(manual):
    edit = apply(shots=1, demo_lang="question")
    assert edit.rewrite("Q?", ASKED) == apply(shots=1).rewrite("Q?", ASKED)  # English: the monolingual set
    german = Question("reliability", "de", "Q?", ("Zenda",))
    assert edit.rewrite("Q?", german) == apply(shots=1, demo_lang="de").rewrite("Q?", ASKED)
    klingon = Question("reliability", "tlh", "Q?", ("Zenda",))  # not a BMIKE-53 language: the English set
    assert edit.rewrite("Q?", klingon) == apply(shots=1).rewrite("Q?", ASKED)


def test_metric_specific_demonstrations_and_other_datasets(manual):
    assert apply(demo_types=["portability"]).info["demonstrations"] == [23, 8, 24, 15, 7, 16, 32, 31]
    with pytest.raises(EditorError, match=r"shots=5 but .* 4 demonstrations of type\(s\) copy"):
        apply(shots=5, demo_types=["copy"])
    counterfact = apply(shots=1, dataset="counterfact").rewrite("Q?", ASKED)
    fact = "The headquarter of Monell Chemical Senses Center is located in Mumbai"
    assert counterfact == demo(fact, fact) + FACT + "Prompt: Q?"


def test_manual_files_match_their_pins(manual):
    assert {name: sha256_of(manual / name) for name in MANUAL_SHA256} == MANUAL_SHA256


def test_missing_manual_files_say_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.setenv("XKE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_fetch", lambda url, timeout: (_ for _ in ()).throw(OSError("offline")))
    _cached_demos.cache_clear()
    with pytest.raises(EditorError, match=r"(?s)bmike53/manual_prompts/zsre.json.*shots=0"):
        apply(shots=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset": "mzsre"}, r"dataset must be one of zsre \| counterfact \| wfd"),
        ({"shots": -1}, r"shots must be >= 0"),
        ({"demo_lang": "xx"}, r"demo_lang must be en .* or question \(each question's own\), got 'xx'"),
        ({"demo_types": ["copy", "paraphrase"]}, r"demo_types must be distinct types from copy\|update"),
        ({"demo_types": ["copy", "copy"]}, r"demo_types must be distinct"),
    ],
)
def test_bad_hparams_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(EditorError, match=message):
        apply(**{"shots": 0, **overrides})


# ---------------------------------------------------------------- chat templates, several edits


def test_context_goes_at_the_start_of_the_user_turn():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    edit = apply(shots=0, tokenizer=tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert edit.rewrite(rendered, ASKED) == f"<|system|>Be brief.\n<|user|>{FACT}Prompt: Q?\n<|assistant|>"
    assert edit.rewrite("Plain?", ASKED) == FACT + "Prompt: Plain?"  # no template: in front
    assert edit.info["chat_template_marker"] == "<|user|>"


def test_batch_edit_states_every_fact_after_the_demonstrations(manual):
    prompt = apply([EDIT, OTHER], shots=1).rewrite("Q?", ASKED)
    assert prompt == demo(*ZSRE[1]) + FACT + f"New Fact: {OTHER.prompt} Seine\nPrompt: Q?"


def test_sequential_edits_write_each_fact_and_the_demonstrations_once(manual):
    editor, model = MikeEditor(), Model()
    first = editor.apply(model, None, [EDIT], hparams(shots=1))
    alone = first.rewrite("Q?", ASKED)
    second = editor.apply(model, None, [OTHER], hparams(shots=1))
    assert first.rewrite("Q?", ASKED) == "Q?"  # the newer edit writes the context of both
    both = second.rewrite(first.rewrite("Q?", ASKED), ASKED)
    assert both == demo(*ZSRE[1]) + FACT + f"New Fact: {OTHER.prompt} Seine\nPrompt: Q?"
    second.restore()
    assert first.rewrite("Q?", ASKED) == alone
    first.restore()
    # a restored edit still describes itself: the deferred (vLLM) path asks its questions after the restore
    assert first.rewrite("Q?", ASKED) == alone and second.rewrite("Q?", ASKED) == both
    third = editor.apply(model, None, [OTHER], hparams(shots=1)).rewrite("Q?", ASKED)
    assert third == demo(*ZSRE[1]) + f"New Fact: {OTHER.prompt} Seine\nPrompt: Q?"


# ---------------------------------------------------------------- through the xke model


def test_post_questions_only_are_asked_in_context_and_the_weights_stay(tiny_llama_dir, monkeypatch):
    contexts: list[str] = []
    readout = HFBackend.readout

    def recording(self, pairs):
        contexts.extend(context for context, _ in pairs)
        return readout(self, pairs)

    monkeypatch.setattr(HFBackend, "readout", recording)
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="mike", shots=0)
    weights = {n: p.clone() for n, p in lm.backend.model.state_dict().items()}
    case = EditCase(
        case_id="c",
        requests=(EDIT,),
        questions=(
            Question("locality", "en", "Who wrote the novel Hamlet?", ("Shakespeare",), phase="pre"),
            Question("reliability", "en", EDIT.prompt, ("Zenda",)),
            Question("reliability", "de", "Was ist die Hauptstadt von Ruritanien?", ("Zenda",)),
        ),
    )
    lm.loglikelihood(loglikelihood_requests({"xke": case.to_doc()}, 0))
    assert contexts == [
        "Who wrote the novel Hamlet?",
        FACT + f"Prompt: {EDIT.prompt}",
        FACT + "Prompt: Was ist die Hauptstadt von Ruritanien?",
    ]
    assert all(torch.equal(t, weights[n]) for n, t in lm.backend.model.state_dict().items())
