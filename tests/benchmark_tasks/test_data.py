"""Data location, download repair and Bi-ZsRE validation. No test touches the network."""

from __future__ import annotations

import ast
import copy
import hashlib
import json
from pathlib import Path

import pytest

from lm_eval_xke import data
from lm_eval_xke.data import (
    BIZSRE_TEST,
    DATA_ENV,
    DataFile,
    DataNotFoundError,
    RecordError,
    load_bizsre,
    locate,
    sha256_of,
)

GOOD_RECORD = {
    "en": {
        "subject": "Glass Candy",
        "src": "What is year of inception of Glass Candy?",
        "rephrase": "What's the year of the start of Glass Candy?",
        "alt": "2006",
        "loc": "nq question: who wrote the song hallelujah",
        "loc_ans": "Leonard Cohen",
        "portability": {"New Question": "What album did Glass Candy release in 2006?", "New Answer": "B/E/A/T/B/O/X"},
    },
    "zh": {
        "subject": "玻璃糖果",
        "src": "玻璃糖果的创立年份是什么时候？",
        "rephrase": "玻璃糖果组合是从什么时候开始的？",
        "alt": "2006年",
        "loc": "谁写了哈利路亚这首歌",
        "loc_ans": "莱昂纳德·科恩",
        "portability": {"New Question": "玻璃糖果组合在2006年发布了哪张专辑？", "New Answer": "B/E/A/T/B/O/X"},
    },
}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No XKE_DATA_DIR, a private cache, and a download that fails loudly if a test forgets to replace it."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))

    def no_network(url, timeout):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(data, "_fetch", no_network)


def write_records(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8"))
    return path


def records_with(index: int, lang: str, change) -> list:
    """Three good records, with ``change(block)`` applied to record ``index``'s ``lang`` block."""
    records = [copy.deepcopy(GOOD_RECORD) for _ in range(3)]
    change(records[index][lang])
    return records


def test_data_module_does_not_import_torch():
    tree = ast.parse(Path(data.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert "torch" not in {name.split(".")[0] for name in names}


# ---------------------------------------------------------------- the real data


def test_real_bizsre_loads_and_matches_pinned_sha(monkeypatch, data_dir):
    monkeypatch.setenv(DATA_ENV, str(data_dir))
    path = locate(BIZSRE_TEST)
    assert path == data_dir / "bizsre" / "bizsre_test.json"
    assert sha256_of(path) == BIZSRE_TEST.sha256
    loaded = load_bizsre()
    assert len(loaded.records) == 1037
    assert [i for i, _ in loaded.records] == list(range(1037))
    assert loaded.skipped == []
    assert loaded.sha256 == BIZSRE_TEST.sha256
    assert loaded.records[506][1]["zh"]["loc"] == "函数的极限何时不存在"


def upstream_like_bytes(data_dir: Path) -> bytes:
    """The real file with the repaired field reverted and different JSON formatting, like the upstream file."""
    records = json.loads((data_dir / BIZSRE_TEST.relpath).read_bytes())
    records[506]["zh"]["loc"] = "尼古拉斯"
    return json.dumps(records, indent=2, ensure_ascii=True).encode("utf-8")


def test_repair_reproduces_pinned_sha(data_dir):
    raw = upstream_like_bytes(data_dir)
    assert hashlib.sha256(raw).hexdigest() != BIZSRE_TEST.sha256
    assert hashlib.sha256(BIZSRE_TEST.repair(raw)).hexdigest() == BIZSRE_TEST.sha256


def test_repair_refuses_a_changed_upstream_file():
    records = [copy.deepcopy(GOOD_RECORD) for _ in range(507)]
    with pytest.raises(ValueError, match="more than 506 Bi-ZsRE records; the upstream file has changed"):
        BIZSRE_TEST.repair(json.dumps(records[:10]).encode())
    records[506]["en"]["subject"] = "Someone Else"
    with pytest.raises(ValueError, match="'Someone Else'"):
        BIZSRE_TEST.repair(json.dumps(records).encode())


def test_download_repairs_verifies_and_caches(monkeypatch, data_dir, tmp_path):
    raw = upstream_like_bytes(data_dir)
    calls = []

    def fake_fetch(url, timeout):
        calls.append(url)
        return raw

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    path = locate(BIZSRE_TEST)
    assert path == tmp_path / "cache" / "data" / "bizsre" / "bizsre_test.json"
    assert sha256_of(path) == BIZSRE_TEST.sha256
    assert calls == [BIZSRE_TEST.url]
    assert locate(BIZSRE_TEST) == path and len(calls) == 1  # served from the cache the second time
    assert [p.name for p in path.parent.iterdir()] == ["bizsre_test.json"]  # no temp file left


def test_download_with_wrong_sha_is_not_saved_and_reported(monkeypatch, tmp_path):
    spec = DataFile("x/file.txt", sha256="0" * 64, url="https://example.invalid/file.txt")
    monkeypatch.setattr(data, "_fetch", lambda url, timeout: b"something else")
    with pytest.raises(DataNotFoundError, match="expected 0000.*not saved"):
        locate(spec)
    folder = tmp_path / "cache" / "data" / "x"
    assert not folder.exists() or list(folder.iterdir()) == []


# ---------------------------------------------------------------- locate precedence and messages


def make_layout(root: Path, content: bytes) -> Path:
    target = root / BIZSRE_TEST.relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    return target


def test_locate_precedence(monkeypatch, tmp_path):
    explicit = make_layout(tmp_path / "explicit", b"explicit")
    env = make_layout(tmp_path / "env", b"env")
    cached = make_layout(tmp_path / "cache" / "data", b"cache")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert locate(BIZSRE_TEST, explicit) == explicit
    assert locate(BIZSRE_TEST, str(tmp_path / "explicit")) == explicit  # a folder holding relpath
    assert locate(BIZSRE_TEST) == env
    monkeypatch.delenv(DATA_ENV)
    assert locate(BIZSRE_TEST) == cached
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty"))  # set but without the file: falls back to the cache
    assert locate(BIZSRE_TEST) == cached


def test_explicit_missing_path_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    make_layout(tmp_path / "env", b"env")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    missing = tmp_path / "nope.json"
    with pytest.raises(DataNotFoundError, match="nope.json does not exist"):
        locate(BIZSRE_TEST, missing)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataNotFoundError, match="emptydir"):
        locate(BIZSRE_TEST, tmp_path / "emptydir")


def test_not_found_message_lists_places_and_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        locate(BIZSRE_TEST)
    message = str(info.value)
    assert str(tmp_path / "env" / "bizsre" / "bizsre_test.json") in message
    assert str(tmp_path / "cache" / "data" / "bizsre" / "bizsre_test.json") in message
    assert BIZSRE_TEST.url in message and "network disabled in tests" in message
    assert f"set {DATA_ENV} to a folder with the same layout as the shared data folder" in message
    assert BIZSRE_TEST.sha256 in message


def test_not_found_without_env_or_url():
    spec = DataFile("x/local_only.json", sha256="0" * 64)
    with pytest.raises(DataNotFoundError, match=f"(?s){DATA_ENV}: not set.*no public URL"):
        locate(spec)


def test_sha256_of_follows_file_changes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    assert sha256_of(path) == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"two!")
    assert sha256_of(path) == hashlib.sha256(b"two!").hexdigest()


# ---------------------------------------------------------------- Bi-ZsRE validation


def test_good_hand_made_file_loads(tmp_path):
    path = write_records(tmp_path / "bizsre_test.json", [GOOD_RECORD, GOOD_RECORD])
    loaded = load_bizsre(path)
    assert [i for i, _ in loaded.records] == [0, 1]
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


BAD_RECORDS = {
    "missing field": (lambda b: b.pop("rephrase"), "field 'rephrase' is missing"),
    "empty target": (lambda b: b.update(alt=""), "field 'alt' is empty"),
    "blank target": (lambda b: b.update(alt="   "), "field 'alt' is empty"),
    "wrong type": (lambda b: b.update(loc_ans=3), "field 'loc_ans' must be a string, got int"),
    "null field": (lambda b: b.update(src=None), "field 'src' must be a string, got null"),
    "portability not a dict": (lambda b: b.update(portability="x"), "field 'portability' must be an object"),
    "portability answer missing": (
        lambda b: b["portability"].pop("New Answer"),
        "field 'portability.New Answer' is missing",
    ),
    "subject not in src": (lambda b: b.update(subject="Nobody"), "subject 'Nobody' does not occur in 'src'"),
}


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_names_file_index_lang_and_field(tmp_path, case, lang):
    change, expected = BAD_RECORDS[case]
    path = write_records(tmp_path / "bizsre_test.json", records_with(1, lang, change))
    with pytest.raises(RecordError) as info:
        load_bizsre(path)
    message = str(info.value)
    assert message.startswith(f"bizsre_test.json record 1 ({lang}): {expected}")
    assert "xke_skip_invalid=true" in message
    assert info.value.problem.index == 1 and info.value.problem.lang == lang


def test_missing_language_block_and_non_object_record(tmp_path):
    records = [copy.deepcopy(GOOD_RECORD), {"en": GOOD_RECORD["en"]}, ["not", "a", "record"]]
    path = write_records(tmp_path / "bizsre_test.json", records)
    with pytest.raises(RecordError, match=r"record 1 \(zh\): the 'zh' block is missing"):
        load_bizsre(path)
    loaded = load_bizsre(path, skip_invalid=True)
    assert [p.index for p in loaded.skipped] == [1, 2]
    assert "expected an object with keys 'en' and 'zh', got a list" in loaded.skipped[1].problem


def test_several_problems_in_one_record_are_counted(tmp_path):
    def break_two(block):
        block["alt"] = ""
        block["loc"] = 5

    path = write_records(tmp_path / "bizsre_test.json", records_with(0, "en", break_two))
    with pytest.raises(RecordError, match=r"record 0 \(en\): field 'alt' is empty \(and 1 more problem"):
        load_bizsre(path)


def test_skip_invalid_drops_and_lists_bad_records(tmp_path):
    records = [copy.deepcopy(GOOD_RECORD) for _ in range(5)]
    records[1]["zh"]["alt"] = ""
    records[3]["en"].pop("src")
    path = write_records(tmp_path / "bizsre_test.json", records)
    loaded = load_bizsre(path, skip_invalid=True)
    assert [i for i, _ in loaded.records] == [0, 2, 4]
    assert [(p.index, p.lang, p.field) for p in loaded.skipped] == [(1, "zh", "alt"), (3, "en", "src")]


def test_all_records_invalid_is_an_error_even_when_skipping(tmp_path):
    path = write_records(tmp_path / "bizsre_test.json", records_with(0, "en", lambda b: b.update(alt=""))[:1])
    with pytest.raises(RecordError, match="no valid Bi-ZsRE records"):
        load_bizsre(path, skip_invalid=True)


def test_top_level_not_a_list(tmp_path):
    path = write_records(tmp_path / "bizsre_test.json", {"0": GOOD_RECORD})
    with pytest.raises(RecordError, match=r"bizsre_test.json must hold a JSON list .* got an object"):
        load_bizsre(path)


def test_truncated_json_names_file_and_position(tmp_path):
    path = write_records(tmp_path / "bizsre_test.json", [GOOD_RECORD, GOOD_RECORD])
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(RecordError) as info:
        load_bizsre(path)
    message = str(info.value)
    assert str(path) in message and "is not valid JSON" in message and "line " in message
    assert "truncated" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_non_utf8_names_file_and_byte(tmp_path):
    path = tmp_path / "bizsre_test.json"
    path.write_bytes(json.dumps([GOOD_RECORD], ensure_ascii=False).encode("gb18030"))
    with pytest.raises(RecordError, match=r"bizsre_test.json is not UTF-8 text: byte \d+"):
        load_bizsre(path)


def test_write_atomic_leaves_no_partial_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "cache" / "trace.json"

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("{half", encoding="utf-8")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data.write_atomic(target, half_then_fail)
    assert list(target.parent.iterdir()) == []
    data.write_atomic(target, lambda tmp: Path(tmp).write_text("{}", encoding="utf-8"))
    assert [p.name for p in target.parent.iterdir()] == ["trace.json"] and target.read_text() == "{}"
