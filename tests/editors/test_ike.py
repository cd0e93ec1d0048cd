"""IKE: the demonstration pool, retrieval, the paper's prompt, chat templates, batch and sequential edits.

In-context editing cannot change a random tiny model's answers (it has no in-context learning to speak of), so the
tiny-model tests check what IKE controls: the exact prompt each question is asked with, and that nothing else
changes. ``tests/editors/test_real_editors.py`` checks that the edit lands on a real model (SmolLM2).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from lm_eval import simple_evaluate

from lm_eval_xke.backends.hf import HFBackend
from lm_eval_xke.cases import EditCase, EditRequest, Question
from lm_eval_xke.editing.in_context import ChatLayout, chat_layout, insert_context
from lm_eval_xke.editors import EditorError
from lm_eval_xke.model import XKELM
from lm_eval_xke.plugins.ike import IkeEditor
from lm_eval_xke.plugins.ike.compute import demo_kinds
from lm_eval_xke.plugins.ike.pool import DemoPool, default_entries
from lm_eval_xke.testing import CHAT_TEMPLATE, byte_level_tokenizer, loglikelihood_requests

FACTS = [
    ("What is the capital of Ruritania?", "Strelsau", "鲁里塔尼亚的首都是哪里？", "斯特雷尔绍"),
    ("Who wrote the novel Hamlet?", "Goethe", "谁写了小说《哈姆雷特》？", "歌德"),
    ("What is the capital of Freedonia?", "Fredville", "自由尼亚的首都是哪里？", "弗雷德维尔"),
    ("Which river flows through Paris?", "Danube", "哪条河流经巴黎？", "多瑙河"),
]
EDIT = EditRequest("What is the capital of Ruritania?", "Ruritania", "Zenda", "en")
OTHER = EditRequest("Which river flows through Vienna?", "Vienna", "Seine", "en")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pool_files(tmp_path) -> list[str]:
    """A four-fact pool in the shared data's layout: en/zh question-answer lines, English ZsRE records."""
    (tmp_path / "en.txt").write_text("".join(f"{q}\t{a}\n" for q, a, _, _ in FACTS), encoding="utf-8")
    (tmp_path / "zh.txt").write_text("".join(f"{q}\t{a}\n" for _, _, q, a in FACTS), encoding="utf-8")
    records = [
        {"src": q, "alt": "ignored", "rephrase": f"Tell me: {q}", "loc": f"nq question: unrelated {i}?", "loc_ans": "X"}
        for i, (q, _, _, _) in enumerate(FACTS)
    ]
    (tmp_path / "en.json").write_text(json.dumps(records), encoding="utf-8")
    return [f"en:{tmp_path / 'en.txt'}", f"zh:{tmp_path / 'zh.txt'}", f"en:{tmp_path / 'en.json'}"]


class Model:
    """Stands in for the model: IKE only keeps its edits in force per model object."""


def hparams(pool: list[str], **overrides):
    return IkeEditor().resolve_hparams("llama", overrides={"demo_pool": pool, **overrides})


# ---------------------------------------------------------------- the pool and retrieval


def test_pool_folds_aligned_files_into_facts(pool_files):
    pool = IkeEditor().pool(hparams(pool_files))
    assert pool.langs == ["en", "zh"] and len(pool.facts) == 4
    fact = pool.facts[1]
    assert fact.questions == {"en": FACTS[1][0], "zh": FACTS[1][2]}
    assert fact.answers == {"en": "Goethe", "zh": "歌德"}  # the first file's answer, not the .json `alt`
    assert fact.paraphrases == {"en": f"Tell me: {FACTS[1][0]}"} and fact.neighbour == (
        "nq question: unrelated 1?",
        "X",
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.txt", None, "p.txt does not exist"),
        ("p.txt", "q\ta\tb\n", r"p.txt:1: expected 'question<TAB>answer', got 2 tabs"),
        ("p.txt", "q\ta\nq2\ta2\n", r"must be record-aligned .*base.txt: 1, p.txt: 2"),
        ("p.txt", "other question\ta\n", "p.txt, record 1 asks 'other question', an earlier en file asks 'question'"),
        ("p.json", "[1, 2]", "p.json must hold a JSON list of records"),
        ("p.json", "[{", "p.json is not valid JSON"),
        ("p.csv", "q,a\n", "p.csv must be .txt"),
    ],
)
def test_pool_file_problems_name_the_file(tmp_path, name, content, message):
    (tmp_path / "base.txt").write_text("question\tanswer\n")
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(EditorError, match=message):
        DemoPool.load([("en", tmp_path / "base.txt"), ("en", tmp_path / name)])


@pytest.mark.parametrize("entry", ["/no/language.txt", "en:", "e n:/x.txt"])
def test_pool_entries_need_a_language(entry):
    with pytest.raises(EditorError, match="must be LANG:PATH"):
        IkeEditor().check_hparams(hparams([entry]))


def test_retrieval_is_nearest_first_with_ties_by_index(tmp_path):
    lines = ["Who founded Acme Corp?\tX", "Where is Mount Zed?\tY", "Where is Mount Zed?\tY", "谁创立了阿克米公司？\tZ"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pool = DemoPool.load([("en", tmp_path / "p.txt")])
    assert pool.nearest("en", "Where is Mount Zed? Y", 3) == [1, 2, 0]
    assert pool.nearest("en", "谁创立了阿克米公司？ Z", 1) == [3]  # character n-grams need no word boundaries
    assert pool.nearest("en", "nothing in common", 4) == [0, 1, 2, 3]  # all scores 0: index order


def test_demo_kinds_follow_the_papers_ratio_reproducibly():
    kinds = demo_kinds(32, [1, 3, 4], random.Random("seed"))
    assert [kinds.count(k) for k in range(3)] == [4, 12, 16]
    assert kinds == demo_kinds(32, [1, 3, 4], random.Random("seed")) != sorted(kinds)
    assert [demo_kinds(3, [1, 3, 4], random.Random(0)).count(k) for k in range(3)] == [0, 1, 2]


# ---------------------------------------------------------------- the prompt


def test_prompt_is_the_papers_layout(pool_files):
    edit = IkeEditor().apply(Model(), byte_level_tokenizer(), [EDIT], hparams(pool_files, k=2, demo_ratio="1|0|0"))
    prompt = edit.prompt_transform("Where is Ruritania's capital?")
    # the two nearest facts as copy demonstrations, nearest last; then the new fact copied; then the question
    assert prompt == (
        "New Fact: What is the capital of Freedonia? Fredville\nPrompt: What is the capital of Freedonia? Fredville\n\n"
        "New Fact: What is the capital of Ruritania? Strelsau\nPrompt: What is the capital of Ruritania? Strelsau\n\n"
        "New Fact: What is the capital of Ruritania? Zenda\nPrompt: What is the capital of Ruritania? Zenda\n\n"
        "New Fact: What is the capital of Ruritania? Zenda\nPrompt: Where is Ruritania's capital?"
    )
    assert edit.info["demonstrations"] == [2]


def test_update_and_retain_demonstrations(pool_files):
    def demos(**overrides) -> str:
        edit = IkeEditor().apply(Model(), byte_level_tokenizer(), [EDIT], hparams(pool_files, k=1, **overrides))
        return edit.prompt_transform("Q").split("\n\n")[0]

    nearest = "New Fact: What is the capital of Ruritania? Strelsau\nPrompt: "
    assert demos(demo_ratio="0|1|0") == f"{nearest}Tell me: What is the capital of Ruritania? Strelsau"
    assert demos(demo_ratio="0|0|1") == f"{nearest}nq question: unrelated 0? X"
    # cross-lingual updates cycle through the paraphrase and the question in the other language
    edit = IkeEditor().apply(
        Model(), byte_level_tokenizer(), [EDIT], hparams(pool_files, k=2, demo_ratio="0|1|0", cross_lingual=True)
    )
    text = edit.prompt_transform("Q")
    assert "Prompt: Tell me: What is the capital of Ruritania? Strelsau" in text
    assert "Prompt: 自由尼亚的首都是哪里？ 弗雷德维尔" in text


def test_chinese_edit_retrieves_chinese_demonstrations(pool_files):
    zh = EditRequest("鲁里塔尼亚的首都是哪里？", "鲁里塔尼亚", "曾达", "zh")
    edit = IkeEditor().apply(Model(), byte_level_tokenizer(), [zh], hparams(pool_files, k=1, demo_ratio="1|0|0"))
    assert edit.prompt_transform("Q").startswith("New Fact: 鲁里塔尼亚的首都是哪里？ 斯特雷尔绍\n")


def test_k_zero_needs_no_pool(monkeypatch, tmp_path):
    monkeypatch.setenv("XKE_DATA_DIR", str(tmp_path))
    edit = IkeEditor().apply(Model(), byte_level_tokenizer(), [EDIT], hparams([], k=0))
    assert edit.prompt_transform("Q").count("New Fact:") == 2 and edit.info["pool"] == []


def test_missing_default_pool_says_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.setenv("XKE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(EditorError, match=r"default demonstration pool is missing(.|\n)*XKE_DATA_DIR(.|\n)*demo_pool="):
        IkeEditor().apply(Model(), byte_level_tokenizer(), [EDIT], hparams([]))


def test_default_pool_is_the_shared_training_data(data_dir, monkeypatch):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    assert [(lang, path.name) for lang, path in default_entries()] == [
        ("en", "zsre_mend_train_en_10000.txt"),
        ("zh", "zsre_mend_train_zh_10000.txt"),
        ("en", "zsre_mend_train_en_10000.json"),
    ]
    pool = IkeEditor().pool(hparams([]))
    assert pool.langs == ["en", "zh"] and len(pool.facts) == 10_000
    assert sum("zh" in f.answers for f in pool.facts) == 9965  # 35 lines have no answer; the .json gives the en one
    assert all(f.paraphrases.keys() == {"en"} and f.neighbour for f in pool.facts)


# ---------------------------------------------------------------- several edits


def test_batch_edit_states_every_fact(pool_files):
    edit = IkeEditor().apply(Model(), byte_level_tokenizer(), [EDIT, OTHER], hparams(pool_files, k=3))
    prompt = edit.prompt_transform("Q")
    assert prompt.endswith(f"New Fact: {EDIT.prompt} Zenda\nNew Fact: {OTHER.prompt} Seine\nPrompt: Q")
    assert prompt.count("\n\n") == 3 + 2  # k demonstrations drawn from both retrievals, one copy of each new fact


def test_sequential_edits_accumulate_and_restore_newest_first(pool_files):
    editor, model, tokenizer = IkeEditor(), Model(), byte_level_tokenizer()
    first = editor.apply(model, tokenizer, [EDIT], hparams(pool_files, k=2))
    alone = first.prompt_transform("Q")
    second = editor.apply(model, tokenizer, [OTHER], hparams(pool_files, k=2))
    assert first.prompt_transform("Q") == "Q"  # while the newer edit is in force, it writes the context of both
    both = second.prompt_transform(first.prompt_transform("Q"))
    assert both.endswith(f"New Fact: {EDIT.prompt} Zenda\nNew Fact: {OTHER.prompt} Seine\nPrompt: Q")
    assert both.count("\n\n") == 2 + 2
    second.restore()
    assert first.prompt_transform("Q") == alone
    first.restore()
    # a restored edit still describes itself: the deferred (vLLM) path asks its questions after the restore
    assert first.prompt_transform("Q") == alone and second.prompt_transform("Q") == both
    third = editor.apply(model, tokenizer, [OTHER], hparams(pool_files, k=2)).prompt_transform("Q")
    assert "Zenda" not in third and third.endswith(f"Seine\n\nNew Fact: {OTHER.prompt} Seine\nPrompt: Q")


# ---------------------------------------------------------------- chat templates

CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[USER] {{ m['content'] }} [/USER]{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "layout"),
    [
        (CHAT_TEMPLATE, ChatLayout("<|user|>", anchored=False)),
        (CHATML, ChatLayout("<|im_end|>\n<|im_start|>user\n", anchored=False)),
        (NO_SYSTEM, ChatLayout("[USER] ", anchored=True)),
        (None, None),
    ],
)
def test_chat_layout_finds_where_the_user_turn_starts(template, layout):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = template
    assert chat_layout(tokenizer) == layout
    if layout is None:
        return
    for system in ([], [{"role": "system", "content": "Be brief."}]) if template != NO_SYSTEM else ([],):
        rendered = tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": "Q?"}], tokenize=False, add_generation_prompt=True
        )
        inserted = insert_context(rendered, "CTX ", layout)
        assert inserted == rendered.replace("Q?", "CTX Q?")


def test_prompt_without_the_template_gets_the_context_in_front():
    layout = ChatLayout("<|user|>", anchored=False)
    assert insert_context("Plain question?", "CTX ", layout) == "CTX Plain question?"
    assert insert_context("Plain question?", "CTX ", None) == "CTX Plain question?"


# ---------------------------------------------------------------- through the xke model


@pytest.fixture
def asked(monkeypatch) -> list[str]:
    """Every context the backend is asked to read out."""
    contexts: list[str] = []
    readout = HFBackend.readout

    def recording(self, pairs):
        contexts.extend(context for context, _ in pairs)
        return readout(self, pairs)

    monkeypatch.setattr(HFBackend, "readout", recording)
    return contexts


def test_post_questions_only_are_asked_in_context_and_the_weights_stay(tiny_llama_dir, pool_files, asked):
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="ike", demo_pool="|".join(pool_files), k=1)
    weights = {n: p.clone() for n, p in lm.backend.model.state_dict().items()}
    case = EditCase(
        case_id="c",
        requests=(EDIT,),
        questions=(
            Question("locality", "en", "Who wrote the novel Hamlet?", ("Goethe",), phase="pre"),
            Question("reliability", "en", EDIT.prompt, ("Zenda",)),
            Question("reliability", "zh", "鲁里塔尼亚的首都是哪里？", ("曾达",)),
        ),
    )
    lm.loglikelihood(loglikelihood_requests({"xke": case.to_doc()}, 0))
    pre, *post = asked
    assert pre == "Who wrote the novel Hamlet?"
    assert [p.rsplit("Prompt: ", 1)[1] for p in post] == [EDIT.prompt, "鲁里塔尼亚的首都是哪里？"]
    assert all(p.startswith("New Fact: What is the capital of Ruritania? Strelsau\n") for p in post)
    assert all(torch.equal(t, weights[n]) for n, t in lm.backend.model.state_dict().items())


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_cli_path_with_chat_template(tiny_llama_dir, data_dir, monkeypatch, xke_tasks, asked, mode):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    out = simple_evaluate(
        task_manager=xke_tasks,
        model="xke",
        model_args=f"pretrained={tiny_llama_dir},device=cpu,editor=ike,k=4,edit_mode={mode},edit_batch_size=2",
        tasks=["bizsre_en"],
        limit=2,
        apply_chat_template=True,
        system_instruction="Answer briefly.",
    )
    assert out["config"]["xke"]["editor"] == "ike" and out["config"]["xke"]["edit_mode"] == mode
    in_context = [c for c in asked if "New Fact:" in c]
    assert len(in_context) == 2 * 8  # the 8 post questions of each case; the 2 pre (locality) ones stay plain
    for context in in_context:
        assert context.startswith("<|system|>Answer briefly.\n<|user|>New Fact: ") and context.endswith("<|assistant|>")
        assert context.count("\n\n") == 4 + (1 if mode == "single" else 2)  # k demonstrations, a copy of each fact
