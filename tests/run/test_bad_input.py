"""Malformed data through every dataset loader: a clear error naming file, record and field, or a counted skip.

The corpus is generated in ``tmp_path`` from small hand-written records (never real data): a valid Bi-ZsRE file and
a valid MLaKE folder (single-hop QA, multi-hop QA and single-hop MCQA in five languages), then one defect per case.
Each case runs the loader a task calls (``custom_dataset``); a few also run through lm-eval's ``TaskManager`` and
``simple_evaluate``, to show the error reaches the user as it is, with no traceback from torch or transformers.
"""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lm_eval_xke.data import MAX_FIELD_CHARS, MLAKE_LANGS, RecordError
from lm_eval_xke.tasks.bizsre import utils as bizsre
from lm_eval_xke.tasks.mlake import utils as mlake

# ---------------------------------------------------------------- a valid corpus, hand-written

N_RECORDS = 3


def bizsre_block(i: int, lang: str) -> dict:
    return {
        "subject": f"Widget {i}",
        "src": f"Which company makes Widget {i}? ({lang})",
        "rephrase": f"Who is the maker of Widget {i}? ({lang})",
        "alt": f"Acme {i}",
        "loc": f"How many legs does a spider have? ({lang})",
        "loc_ans": "eight",
        "portability": {
            "New Question": f"Where is the maker of Widget {i} based? ({lang})",
            "New Answer": "Springfield",
        },
    }


def write_bizsre(folder: Path) -> Path:
    path = folder / "bizsre_test.json"
    records = [{lang: bizsre_block(i, lang) for lang in bizsre.LANGS} for i in range(N_RECORDS)]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def mlake_qa(i: int) -> dict:
    return {
        "question": f"What is the capital of Landia {i}?",
        "o_prompt": f"The capital of Landia {i} is Oldtown.",
        "o_answer": "Oldtown",
        "o_answer_aliases": ["Old Town"],
        "e_prompt": f"The capital of Landia {i} is Newtown {i}.",
        "e_answer": f"Newtown {i}",
        "e_answer_aliases": [f"New Town {i}"],
    }


def mlake_multihop(i: int) -> dict:
    return {
        "question": f"Which river flows through the capital of Landia {i}?",
        "e_prompt": mlake_qa(i)["e_prompt"],  # the English edit sentence: the join key
        "e_answer": f"River {i}",
        "e_answer_aliases": [],
    }


def mlake_mcqa(i: int) -> dict:
    return {
        **{k: mlake_qa(i)[k] for k in ("question", "o_prompt", "e_prompt")},
        "options": ["Oldtown", f"Newtown {i}", "Elsewhere", "Nowhere"],
        "o_answer": "A",
        "e_answer": "B",
    }


MLAKE_FILES = {
    "single_hop/qa/{lang}_qa.json": mlake_qa,
    "multi_hop/qa/new_{lang}_qa.json": mlake_multihop,
    "single_hop/mcqa/{lang}_mcqa.json": mlake_mcqa,
}


def write_mlake(folder: Path) -> Path:
    for pattern, record in MLAKE_FILES.items():
        for lang in MLAKE_LANGS:
            path = folder / "mlake" / pattern.format(lang=lang)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([record(i) for i in range(N_RECORDS)], ensure_ascii=False), encoding="utf-8")
    return folder


# ---------------------------------------------------------------- the loaders, as the task YAMLs call them

LOADERS: dict[str, Callable[..., object]] = {
    "bizsre_en": lambda path, **o: bizsre.load_dataset(
        xke_edit_lang="en", xke_protocol="teacher_forced", xke_data_file=str(path), **o
    ),
    "mlake_en": lambda path, **o: mlake.load_dataset(xke_edit_lang="en", xke_data_file=str(path), **o),
    "mlake_multihop_en": lambda path, **o: mlake.load_multihop_dataset(
        xke_mlake_test_lang="en", xke_data_file=str(path), **o
    ),
    "mlake_mc_en": lambda path, **o: mlake.load_mc_dataset(xke_edit_lang="en", xke_data_file=str(path), **o),
}


def corpus(tmp_path: Path, task: str) -> tuple[Path, Path]:
    """(the folder or file a loader is given, the data folder to damage)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if task.startswith("bizsre"):
        return write_bizsre(tmp_path), tmp_path
    return write_mlake(tmp_path), tmp_path


def docs_of(dataset) -> list[dict]:
    return list(dataset["test"])


def test_the_valid_corpus_loads_through_every_loader(tmp_path):
    for task, load in LOADERS.items():
        given, _ = corpus(tmp_path / task, task)
        docs = docs_of(load(given))
        assert [d["record_index"] for d in docs] == list(range(N_RECORDS)), task


# ---------------------------------------------------------------- one defect per case


def edit_records(relpath: str, change: Callable[[list], object]) -> Callable[[Path], None]:
    """A defect: ``change`` applied to the list of records in the file at ``relpath``."""

    def damage(folder: Path) -> None:
        path = folder / relpath
        records = json.loads(path.read_text(encoding="utf-8"))
        change(records)
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")

    return damage


def edit_record(relpath: str, index: int, change: Callable[[dict], object]) -> Callable[[Path], None]:
    """A defect: ``change`` applied in place to record ``index`` of the file at ``relpath``."""
    return edit_records(relpath, lambda records: change(records[index]))


def replace_record(relpath: str, index: int, record: object) -> Callable[[Path], None]:
    return edit_records(relpath, lambda records: records.__setitem__(index, record))


def drop_last(relpath: str) -> Callable[[Path], None]:
    return edit_records(relpath, lambda records: records.pop())


@dataclass(frozen=True)
class Defect:
    task: str
    damage: Callable[[Path], None]
    file: str  # the file name the message must start with
    record: str  # e.g. "record 1" (the index is the record's id in both benchmarks)
    field: str  # the field the message must name, quoted as in the message
    skipped_key: str = "skipped_invalid"  # where the loader counts it under xke_skip_invalid=true
    skipped: int = 1


def pop(key: str) -> Callable[[dict], object]:
    return lambda record: record.pop(key)


def put(key: str, value: object) -> Callable[[dict], object]:
    return lambda record: record.update({key: value})


def in_lang(lang: str, change: Callable[[dict], object]) -> Callable[[dict], object]:
    return lambda record: change(record[lang])


BIZSRE, EN_QA = "bizsre_test.json", "mlake/single_hop/qa/en_qa.json"
EN_MULTI, EN_MC = "mlake/multi_hop/qa/new_en_qa.json", "mlake/single_hop/mcqa/en_mcqa.json"
HUGE = "x" * (MAX_FIELD_CHARS * 50)

DEFECTS = {
    # Bi-ZsRE: records have no id of their own; the index is the id (case ids bizsre-<index>)
    "bizsre missing field": Defect(
        "bizsre_en", edit_record(BIZSRE, 1, in_lang("en", pop("loc"))), BIZSRE, "record 1 (en)", "'loc' is missing"
    ),
    "bizsre empty field": Defect(
        "bizsre_en", edit_record(BIZSRE, 1, in_lang("zh", put("alt", " "))), BIZSRE, "record 1 (zh)", "'alt' is empty"
    ),
    "bizsre wrong type": Defect(
        "bizsre_en",
        edit_record(BIZSRE, 2, in_lang("en", put("src", 42))),
        BIZSRE,
        "record 2 (en)",
        "'src' must be a string, got int",
    ),
    "bizsre portability not an object": Defect(
        "bizsre_en",
        edit_record(BIZSRE, 0, in_lang("zh", put("portability", []))),
        BIZSRE,
        "record 0 (zh)",
        "'portability' must be an object",
    ),
    "bizsre subject absent from prompt": Defect(
        "bizsre_en",
        edit_record(BIZSRE, 1, in_lang("en", put("subject", "Gadget"))),
        BIZSRE,
        "record 1 (en)",
        "subject 'Gadget' does not occur in 'src'",
    ),
    "bizsre huge string": Defect(
        "bizsre_en",
        edit_record(BIZSRE, 1, in_lang("en", put("rephrase", HUGE))),
        BIZSRE,
        "record 1 (en)",
        f"'rephrase' is {len(HUGE):,} characters long",
    ),
    "bizsre unknown language code": Defect(
        "bizsre_en",
        edit_record(BIZSRE, 1, lambda r: r.update(cn=r.pop("zh"))),
        BIZSRE,
        "record 1 (zh)",
        "the 'zh' block is missing",
    ),
    "bizsre record not an object": Defect(
        "bizsre_en",
        replace_record(BIZSRE, 1, "Widget"),
        BIZSRE,
        "record 1",
        "expected an object with keys 'en' and 'zh', got a string",
    ),
    # MLaKE single-hop QA (the edit and all five test files)
    "mlake missing field": Defect(
        "mlake_en", edit_record(EN_QA, 1, pop("question")), "en_qa.json", "record 1 (en)", "'question' is missing"
    ),
    "mlake empty field": Defect(
        "mlake_en", edit_record(EN_QA, 1, put("e_answer", "")), "en_qa.json", "record 1 (en)", "'e_answer' is empty"
    ),
    "mlake wrong type": Defect(
        "mlake_en",
        edit_record(EN_QA, 1, put("e_answer_aliases", "New Town")),
        "en_qa.json",
        "record 1 (en)",
        "'e_answer_aliases' must be a list of strings, got a string",
    ),
    "mlake wrong item type": Defect(
        "mlake_en",
        edit_record("mlake/single_hop/qa/ja_qa.json", 2, put("o_answer_aliases", [3])),
        "ja_qa.json",
        "record 2 (ja)",
        "'o_answer_aliases[0]' must be a string, got int",
    ),
    "mlake huge string": Defect(
        "mlake_en", edit_record(EN_QA, 0, put("o_prompt", HUGE)), "en_qa.json", "record 0 (en)", "'o_prompt' is"
    ),
    "mlake no subject in prompt": Defect(
        "mlake_en",
        edit_record(EN_QA, 1, lambda r: r.update(e_prompt="?!", o_prompt="?", question="¿?")),
        "en_qa.json",
        "record 1 (en)",
        "field 'e_prompt': no edit prompt",
    ),
    # MLaKE multi-hop: the question file, and the English single-hop rows it joins on (e_prompt is the id)
    "multihop missing field": Defect(
        "mlake_multihop_en",
        edit_record(EN_MULTI, 1, pop("e_prompt")),
        "new_en_qa.json",
        "record 1 (en)",
        "'e_prompt' is missing",
    ),
    "multihop null field": Defect(
        "mlake_multihop_en",
        edit_record(EN_MULTI, 0, put("question", None)),
        "new_en_qa.json",
        "record 0 (en)",
        "'question' must be a string, got null",
    ),
    "multihop duplicate id": Defect(
        "mlake_multihop_en",
        edit_record(EN_QA, 2, put("e_prompt", mlake_qa(0)["e_prompt"])),
        "en_qa.json",
        "record 2 (en)",
        "'e_prompt' repeats record 0's",
        skipped_key="unjoined",
        skipped=2,
    ),
    # MLaKE multiple choice
    "mc three options": Defect(
        "mlake_mc_en",
        edit_record(EN_MC, 1, put("options", ["a", "b", "c"])),
        "en_mcqa.json",
        "record 1 (en)",
        "expected 4 options, got 3",
    ),
    "mc empty option": Defect(
        "mlake_mc_en",
        edit_record("mlake/single_hop/mcqa/fr_mcqa.json", 1, put("options", ["a", "b", "c", ""])),
        "fr_mcqa.json",
        "record 1 (fr)",
        "'options[3]' is empty",
    ),
    "mc answer not a letter": Defect(
        "mlake_mc_en",
        edit_record(EN_MC, 2, put("e_answer", "E")),
        "en_mcqa.json",
        "record 2 (en)",
        "'e_answer' must be a letter A-D",
    ),
}


def assert_no_deep_traceback(error: BaseException) -> None:
    """The error is raised by our own code: no frame of torch or transformers is on its traceback."""
    frames = "".join(traceback.format_exception(error))
    assert "/torch/" not in frames and "/transformers/" not in frames, frames


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_defect_names_file_record_and_field(tmp_path, name):
    defect = DEFECTS[name]
    given, folder = corpus(tmp_path, defect.task)
    defect.damage(folder)
    with pytest.raises(RecordError) as info:
        LOADERS[defect.task](given)
    message = str(info.value)
    assert message.startswith(f"{defect.file} {defect.record}: "), message
    assert defect.field in message and "xke_skip_invalid=true" in message
    assert "\n" not in message
    assert_no_deep_traceback(info.value)


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_defect_is_skipped_and_counted_under_the_skip_option(tmp_path, name):
    defect = DEFECTS[name]
    given, folder = corpus(tmp_path, defect.task)
    defect.damage(folder)
    docs = docs_of(LOADERS[defect.task](given, xke_skip_invalid=True))
    source = docs[0]["xke"]["source"]
    assert source[defect.skipped_key] == defect.skipped
    assert len(docs) == N_RECORDS - defect.skipped == source["records"]


# ---------------------------------------------------------------- whole-file defects


def truncate(relpath: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / relpath
        path.write_bytes(path.read_bytes()[:-25])

    return damage


def latin1(relpath: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / relpath
        text = path.read_text(encoding="utf-8").replace("Oldtown", "Öldtown").replace("Widget", "Wídget")
        path.write_bytes(text.encode("latin-1"))

    return damage


def replace_file(relpath: str, content: object) -> Callable[[Path], None]:
    return lambda folder: (folder / relpath).write_text(json.dumps(content), encoding="utf-8")


FILE_DEFECTS = {
    "bizsre truncated JSON": (
        "bizsre_en",
        truncate(BIZSRE),
        r"bizsre_test.json is not valid JSON: .* line \d+, column \d+ .*truncated",
    ),
    "bizsre non-UTF-8": ("bizsre_en", latin1(BIZSRE), r"bizsre_test.json is not UTF-8 text: byte \d+"),
    "bizsre not a list": (
        "bizsre_en",
        replace_file(BIZSRE, {"0": {}}),
        r"bizsre_test.json must hold a JSON list of Bi-ZsRE records .*got an object",
    ),
    "bizsre empty list": (
        "bizsre_en",
        replace_file(BIZSRE, []),
        r"bizsre_test.json holds no valid Bi-ZsRE records .*0 in all",
    ),
    "mlake truncated JSON": (
        "mlake_en",
        truncate("mlake/single_hop/qa/de_qa.json"),
        r"de_qa.json is not valid JSON: .*truncated",
    ),
    "mlake non-UTF-8": (
        "mlake_mc_en",
        latin1("mlake/single_hop/mcqa/zh_mcqa.json"),
        r"zh_mcqa.json is not UTF-8 text: byte \d+",
    ),
    "mlake empty list": (
        "mlake_multihop_en",
        replace_file(EN_MULTI, []),
        r"new_en_qa.json holds no valid MLaKE records",
    ),
    "mlake not a list": (
        "mlake_en",
        replace_file(EN_QA, "records"),
        r"en_qa.json must hold a JSON list of MLaKE records, got a string",
    ),
    "mlake a language lost a record": (
        "mlake_en",
        drop_last("mlake/single_hop/qa/fr_qa.json"),
        r"aligned by record index .*en_qa.json 3, .*fr_qa.json 2",
    ),
    "mlake mc a language lost a record": (
        "mlake_mc_en",
        drop_last("mlake/single_hop/mcqa/ja_mcqa.json"),
        r"record counts differ .*ja_mcqa.json 2",
    ),
}


@pytest.mark.parametrize("name", sorted(FILE_DEFECTS))
def test_file_defect_names_the_file_and_where(tmp_path, name):
    task, damage, expected = FILE_DEFECTS[name]
    given, folder = corpus(tmp_path, task)
    damage(folder)
    with pytest.raises(RecordError, match=expected) as info:
        LOADERS[task](given)
    assert "\n" not in str(info.value)
    assert_no_deep_traceback(info.value)


def test_a_language_that_lost_records_is_skipped_and_counted(tmp_path):
    given, folder = corpus(tmp_path, "mlake_en")
    drop_last("mlake/single_hop/qa/zh_qa.json")(folder)
    docs = docs_of(LOADERS["mlake_en"](given, xke_skip_invalid=True))
    assert [d["record_index"] for d in docs] == [0, 1]
    assert docs[0]["xke"]["source"]["skipped_invalid"] == 1


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("task", "options", "expected"),
    [
        (
            "mlake_multihop_en",
            {"xke_mlake_edit_lang": "es"},
            "xke_mlake_edit_lang must be one of en, zh, ja, fr, de, got 'es'",
        ),
        ("mlake_en", {"xke_skip_invalid": "maybe"}, "xke_skip_invalid must be true or false, got 'maybe'"),
        ("bizsre_en", {"xke_skip_invalid": "sure"}, "xke_skip_invalid must be true or false, got 'sure'"),
    ],
)
def test_bad_option_names_the_option(tmp_path, task, options, expected):
    given, _ = corpus(tmp_path, task)
    with pytest.raises(ValueError, match=expected):
        LOADERS[task](given, **options)


def test_unknown_edit_language_of_a_task_is_named(tmp_path):
    path = write_bizsre(tmp_path)
    with pytest.raises(ValueError, match="xke_edit_lang must be one of en, zh, got 'de'"):
        bizsre.load_dataset(xke_edit_lang="de", xke_protocol="teacher_forced", xke_data_file=str(path))


def test_duplicate_bizsre_records_stay_distinct_cases(tmp_path):
    path = write_bizsre(tmp_path)
    records = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps([records[0], records[0]]), encoding="utf-8")
    docs = docs_of(LOADERS["bizsre_en"](path))
    assert [d["xke"]["case_id"] for d in docs] == ["bizsre-0", "bizsre-1"]


# ---------------------------------------------------------------- through lm-eval's own loading path


@pytest.mark.parametrize(
    ("task", "name"),
    [
        ("bizsre_en", "bizsre wrong type"),
        ("mlake_en", "mlake empty field"),
        ("mlake_multihop_en", "multihop duplicate id"),
        ("mlake_mc_en", "mc three options"),
    ],
)
def test_task_manager_reports_the_record_error_as_is(tmp_path, task, name):
    from lm_eval.tasks import TaskManager

    defect = DEFECTS[name]
    given, folder = corpus(tmp_path, task)
    defect.damage(folder)
    manager = TaskManager(include_defaults=False, metadata={"xke_data_file": str(given)})
    with pytest.raises(RecordError, match=f"^{re.escape(defect.file)} {re.escape(defect.record)}: ") as info:
        manager.load([task])
    assert_no_deep_traceback(info.value)
    skipping = TaskManager(include_defaults=False, metadata={"xke_data_file": str(given), "xke_skip_invalid": True})
    assert len(skipping.load([task])["tasks"][task].test_docs()) == N_RECORDS - defect.skipped


def test_simple_evaluate_with_a_model_stops_at_the_record_error(tmp_path, tiny_llama_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    defect = DEFECTS["bizsre huge string"]
    given, folder = corpus(tmp_path, "bizsre_en")
    defect.damage(folder)
    model_args = {"pretrained": str(tiny_llama_dir), "device": "cpu", "editor": "none", "xke_data_file": str(given)}
    with pytest.raises(RecordError, match=r"^bizsre_test.json record 1 \(en\): field 'rephrase' is") as info:
        simple_evaluate(
            model="xke",
            model_args=model_args,
            tasks=["bizsre_en"],
            task_manager=TaskManager(include_defaults=False, metadata=model_args),
            limit=1,
        )
    assert_no_deep_traceback(info.value)
