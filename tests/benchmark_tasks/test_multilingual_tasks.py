"""Parallel tables: joins, defects, subject location, the shared scoring, MzsRE / BMIKE-53 on the real data, and a
user's own multilingual files through the stock `lm_eval` CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lm_eval_xke.cases import EditCase
from lm_eval_xke.failed_edits import failed_answer
from lm_eval_xke.parallel import ZSRE_FIELD_MAP, JoinError, join, locate_subject
from lm_eval_xke.parallel_cases import parse_test_langs, process_results, table_dataset
from lm_eval_xke.parallel_data import load_bmike53, load_mzsre
from lm_eval_xke.tasks import _generate_configs

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "templates" / "multilingual_task"
LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))


def block(subject: str, src: str, alt: str, **more: str) -> dict:
    portability = {"New Question": f"Why {subject}?", "New Answer": "because"}
    return {"subject": subject, "src": src, "alt": alt, "rephrase": f"{src} (again)", "loc": "Water boils at",
            "loc_ans": "100", "portability": portability, **more}  # fmt: skip


# ---------------------------------------------------------------- the generated task YAMLs


def test_generated_task_yamls_are_committed_as_generated():
    expected = _generate_configs.all_files()
    for rel, text in expected.items():
        assert (REPO / "tasks" / rel).read_text(encoding="utf-8") == text, f"{rel}: run tasks/_generate_configs.py"
    generated = {
        str(p.relative_to(REPO / "tasks"))
        for p in (REPO / "tasks").rglob("*.yaml")
        if p.read_text(encoding="utf-8").startswith(_generate_configs.HEADER)
    }
    assert generated == set(expected)  # no stale generated task left behind
    assert len([r for r in expected if "/mzsre_" in r]) == 24 and len([r for r in expected if "/bmike53_" in r]) == 318


# ---------------------------------------------------------------- subjects in prompts


@pytest.mark.parametrize(
    ("prompt", "subject", "lang", "found", "how"),
    [
        ("Where was Ada Lovelace born?", "Ada Lovelace", "en", "Ada Lovelace", "exact"),
        ("Where was ada lovelace born?", "Ada Lovelace", "en", "ada lovelace", "casefold"),
        ("Какой тип голоса у Марии Ивановой?", "Мария Иванова", "ru", "Марии Ивановой", "fuzzy"),
        ("Kolik obyvatel žije v Praze?", "Praha", "cs", "Praze", "fuzzy"),
        ("伊娃·史密斯出生在哪个城市？", "伊娃·史密特", "zh", "伊娃·史密斯", "fuzzy"),
        (
            "エヴァ・スミスはどこで生まれましたか？",
            "Eva Smith",
            "ja",
            "エヴァ・スミスはどこで生まれましたか",
            "whole_prompt",
        ),
    ],
)
def test_locate_subject(prompt, subject, lang, found, how):
    assert locate_subject(prompt, subject, lang) == (found, how)
    assert found in prompt


# ---------------------------------------------------------------- joins and their report


def test_join_keeps_complete_records_and_counts_the_rest_per_language():
    records = [
        (0, "a", {"en": block("Ada", "Ada plays", "chess"), "de": block("Ada", "Ada spielt", "Schach")}),
        (1, "b", {"en": block("Bob", "Bob plays", "go")}),  # no German block
        (2, "c", {"en": block("Cy", "Cy plays", "golf"), "de": block("Cy", "Cy spielt", " ")}),  # empty field
        (3, "d", {"en": block("Di", "Di plays", "polo"), "de": "not a block"}),
    ]
    table = join("t", records, ["en", "de"], ZSRE_FIELD_MAP, {"f": {"file": "f", "sha256": "0"}})
    assert [row.key for row in table.rows] == ["a"]
    assert table.rows[0].blocks["de"]["port"] == "Why Ada?"  # nested field path
    assert table.roles == ("reliability", "generality", "locality", "portability")
    report = table.report.as_dict(len(table.rows))
    assert report["dropped_per_lang"] == {
        "de": {"block is not an object": 1, "field 'alt' empty": 1, "language block missing": 1}
    }
    assert report["dropped_indices"] == [1, 2, 3] and report["records_in_table"] == 4


def test_a_language_missing_everywhere_is_a_clear_error():
    records = [(0, "a", {"en": block("Ada", "Ada plays", "chess")})]
    table = join("t", records, ["en", "de"], ZSRE_FIELD_MAP, {})
    with pytest.raises(ValueError, match=r"no record has a usable block in every language asked \(en, de\)"):
        table_dataset(table, "en", ["en", "de"], {"xke_protocol": "teacher_forced"}, "t")


def test_parse_test_langs():
    assert parse_test_langs(None, ("en", "de", "fr"), ("en", "de")) == ("en", "de")
    assert parse_test_langs("all", ("en", "de", "fr"), ("en",)) == ("en", "de", "fr")
    assert parse_test_langs("fr|de", ("en", "de", "fr"), ("en",)) == ("fr", "de")
    with pytest.raises(ValueError, match="xke_test_langs: xx not in this benchmark"):
        parse_test_langs("de|xx", ("en", "de"), ("en",))


def _mzsre_folder(root: Path, langs: dict[str, str], english_override: dict | None = None) -> Path:
    folder = root / "mzsre"
    folder.mkdir(parents=True)
    for code, word in langs.items():
        items = []
        for i in range(3):
            en = block(f"S{i}", f"Where is S{i}?", f"City{i}")
            if english_override and code in english_override and i == 1:
                en = {**en, **english_override[code]}
            items.append({"en": en, code: block(f"S{i}", f"{word} S{i}?", f"City{i}")})
        (folder / f"mzsre_test_duplicate_en{code}.json").write_text(json.dumps(items), encoding="utf-8")
    return root


def test_mzsre_joins_by_index_under_iso_codes(tmp_path):
    root = _mzsre_folder(tmp_path, {"de": "Wo ist", "cz": "Kde je", "zh": "在哪里"})
    table = load_mzsre(["en", "cs", "de", "zh"], root)
    assert table.langs == ("en", "cs", "de", "zh") and len(table.rows) == 3
    assert table.rows[2].blocks["cs"]["src"] == "Kde je S2?"
    assert sorted(table.files) == ["mzsre_test_duplicate_encz.json", "mzsre_test_duplicate_ende.json",
                                   "mzsre_test_duplicate_enzh.json"]  # fmt: skip


def test_mzsre_refuses_pair_files_that_are_not_one_table(tmp_path):
    root = _mzsre_folder(tmp_path, {"de": "Wo ist", "zh": "在哪里"}, {"zh": {"alt": "Elsewhere"}})
    with pytest.raises(JoinError, match=r"MzsRE record 1: the English block of mzsre_test_duplicate_enzh.json: "
                                        r"field 'alt' differs \('City1' vs 'Elsewhere'\)"):  # fmt: skip
        load_mzsre(["en", "de", "zh"], root)


def test_mzsre_needs_a_folder_not_one_file(tmp_path):
    root = _mzsre_folder(tmp_path, {"de": "Wo ist"})
    with pytest.raises(ValueError, match="is a file, but this benchmark is read from several files"):
        load_mzsre(["en", "de"], root / "mzsre" / "mzsre_test_duplicate_ende.json")


# ---------------------------------------------------------------- scoring


def _readout(answer: str, target: str) -> tuple:
    ids = [ord(c) for c in answer]
    out = {"answer": answer, "target": target, "answer_ids": ids, "target_ids": [ord(c) for c in target]}
    return (-1.0, answer == target, json.dumps(out))


def test_scores_cross_lingual_means_and_old_answer(tmp_path):
    blocks = {
        lang: {**block("Ada", f"Ada {lang}?", f"new-{lang}"), "old": f"old-{lang}"} for lang in ("en", "de", "fr")
    }
    fields = {**ZSRE_FIELD_MAP, "old": "old"}
    table = join("t", [(0, "k", blocks)], ["en", "de", "fr"], fields, {"f": {"file": "f", "sha256": "0"}})
    (doc,) = table_dataset(table, "de", ["en", "de", "fr"], {"xke_protocol": "teacher_forced"}, "t")["test"]
    case = EditCase.from_doc(doc["xke"])
    order = [(q.role, q.lang, q.phase) for q in case.questions]
    assert order[:3] == [("reliability", "de", "post"), ("reliability", "en", "post"), ("reliability", "fr", "post")]
    assert order[-3:] == [("old_answer", "en", "post"), ("old_answer", "de", "post"), ("old_answer", "fr", "post")]

    def answer(q):  # right in en, wrong in fr; the old answer still given in fr
        if q.role == "old_answer":
            return _readout(q.answers[0] if q.lang == "fr" else "x", q.answers[0])
        return _readout(q.answers[0] if q.lang != "fr" else "x", q.answers[0])

    scores = process_results(doc, [answer(q) for q in case.questions])
    assert scores["reliability_en_em"] == 1.0 and scores["reliability_fr_em"] == 0.0
    assert scores["reliability_xavg_em"] == 0.5  # en and fr, not the edit language de
    assert scores["old_answer_xavg_em"] == 0.5 and scores["old_answer_de_em"] == 0.0
    failed = process_results(doc, [failed_answer("loglikelihood", ("", q.answers[0]), "boom") for q in case.questions])
    assert failed["old_answer_fr_em"] == 1.0 and failed["reliability_fr_em"] == 0.0 and failed["locality_xavg_f1"] == 0


# ---------------------------------------------------------------- the real benchmarks


def test_bmike53_real_defects_are_counted_not_crashed_on(data_dir):
    he = load_bmike53("zsre", ["en", "he"], data_dir)
    assert len(he.rows) == 743 - 39
    assert he.report.as_dict(len(he.rows))["dropped_per_lang"] == {"he": {"language block missing": 39}}
    wfd = load_bmike53("wfd", ["en", "de"], data_dir)
    assert len(wfd.rows) == 779 and wfd.roles[-1] == "old_answer"
    assert wfd.report.as_dict(len(wfd.rows))["dropped_per_lang"]["en"] == {"field 'loc_ans' empty": 5}


def test_mzsre_real_table_has_twelve_languages(data_dir):
    table = load_mzsre(("en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"), data_dir)
    assert len(table.rows) == 743 and len(table.files) == 11 and not table.report.dropped_indices


# ---------------------------------------------------------------- a user's own files, no code


@pytest.fixture(scope="module")
def cli_run(tiny_llama_dir, data_dir, tmp_path_factory) -> Path:
    """One stock `lm_eval` run of a user's task folder (edit in German) and BMIKE-53 CounterFact, samples logged."""
    root = tmp_path_factory.mktemp("cli")
    folder = root / "mytask"
    shutil.copytree(TEMPLATE, folder)
    (folder / "mybench_ml_en.yaml").rename(folder / "mybench_ml_de.yaml")
    yaml = (folder / "mybench_ml_de.yaml").read_text(encoding="utf-8")
    (folder / "mybench_ml_de.yaml").write_text(
        yaml.replace("task: mybench_ml_en", "task: mybench_ml_de").replace("xke_edit_lang: en", "xke_edit_lang: de"),
        encoding="utf-8",
    )
    model_args = f"pretrained={tiny_llama_dir},editor=none"
    tasks = "mybench_ml_de,bmike53_counterfact_de"
    args = ["--include_path", str(folder), "--tasks", tasks, "--model", "xke", "--limit", "2",
            "--output_path", str(root / "out"), "--log_samples", "--model_args", model_args]  # fmt: skip
    env = {**os.environ, "XKE_DATA_DIR": str(data_dir)}
    done = subprocess.run([LM_EVAL, *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return next((root / "out").rglob("results_*.json"))


def test_users_multilingual_files_run_through_lm_eval(cli_run):
    results = json.loads(cli_run.read_text(encoding="utf-8"))
    metrics = results["results"]["mybench_ml_de"]
    for key in ("reliability_de_em", "reliability_fr_f1", "generality_en_em", "locality_xavg_em"):
        assert f"{key},none" in metrics
    assert not any(k.startswith("portability") for k in metrics)  # the data has no portability fields
    assert results["n-samples"]["mybench_ml_de"]["effective"] == 2
    mine = next(d for d in results["config"]["xke"]["data"] if d["benchmark"] == "mybench_ml")
    assert mine["join"]["dropped_per_lang"] == {"fr": {"field 'target_new' empty": 1}}
    assert mine["edit_lang"] == "de" and mine["test_langs"] == ["en", "de", "fr"]
    assert results["higher_is_better"]["bmike53_counterfact_de"]["old_answer_de_em"] is False


def test_bmike53_bundle_verifies_and_a_changed_score_is_rejected(cli_run, tmp_path):
    from lm_eval_xke.reporting.submission import SubmissionError, make_bundle, verify_bundle

    bundle = make_bundle(cli_run, tmp_path / "run.zip")
    report = "\n".join(verify_bundle(bundle))
    assert re.search(r"bmike53_counterfact_de: 2 samples, [1-9][0-9]* per-sample scores recomputed", report)
    assert re.search(r"mybench_ml_de: 2 samples, [1-9][0-9]* per-sample scores recomputed", report)
    with zipfile.ZipFile(bundle) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    name = "samples/bmike53_counterfact_de.jsonl"
    first, *rest = files[name].decode().splitlines()
    row = json.loads(first)
    row["old_answer_de_em"] = 1.0 - row["old_answer_de_em"]
    files[name] = "\n".join([json.dumps(row), *rest]).encode() + b"\n"
    manifest = json.loads(files["manifest.json"])
    manifest["sha256"][name] = hashlib.sha256(files[name]).hexdigest()
    files["manifest.json"] = json.dumps(manifest).encode()
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(tampered, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)
    with pytest.raises(SubmissionError, match="old_answer_de_em"):
        verify_bundle(tampered)


# ---------------------------------------------------------------- leaderboard and transfer matrix


def _parallel_results(path: Path) -> Path:
    def metrics(edit: str, langs: list[str], value: float) -> dict:
        out = {f"{role}_{lang}_{m},none": value for role in ("reliability", "generality") for lang in langs
               for m in ("em", "f1")}  # fmt: skip
        out.update({f"{role}_xavg_{m},none": value / 2 for role in ("reliability", "generality") for m in ("em", "f1")})
        return out

    results = {
        "bmike53_zsre_de": metrics("en", ["en", "de"], 0.5),
        "bmike53_zsre_fr": metrics("en", ["en", "fr"], 0.25),
        "mzsre_de": metrics("de", ["en", "de", "zh"], 1.0),
    }
    configs = {task: {"metadata": {"xke_protocol": "teacher_forced"}} for task in results}
    configs["bmike53_zsre_de"]["metadata"]["xke_bmike53_lang"] = "de"
    configs["bmike53_zsre_fr"]["metadata"]["xke_bmike53_lang"] = "fr"
    configs["mzsre_de"]["metadata"]["xke_edit_lang"] = "de"
    data = [
        {"file": "mzsre (2 files)", "benchmark": "mzsre", "sha256": "a" * 64, "f1": "harmonic"},
        {"file": "bmike53/zsRE (1 file)", "benchmark": "bmike53-zsre", "sha256": "b" * 64, "f1": "harmonic"},
    ]
    file = path / "results_2026-01-01.json"
    file.write_text(json.dumps({
        "results": results, "configs": configs, "model_name": "m",
        "n-samples": {task: {"effective": 4, "original": 4} for task in results},
        "config": {"model_args": {"pretrained": "/m"}, "xke": {"editor": "rome", "data": data}},
    }))  # fmt: skip
    return file


def test_leaderboard_shows_summary_columns_and_per_language_on_request(tmp_path):
    from lm_eval_xke.reporting.leaderboard import leaderboard

    _parallel_results(tmp_path)
    table = leaderboard([tmp_path], fmt="csv")
    header, *rows = table.strip().splitlines()
    assert "bmike53_zsre:rel_em" in header and "mzsre:reliability_xavg_f1" in header
    assert "mzsre:reliability_zh_em" not in header
    assert sorted(row.split(",")[2] for row in rows) == ["de", "en>de", "en>fr"]
    assert "mzsre:reliability_zh_em" in leaderboard([tmp_path], fmt="csv", per_language=True)


def test_transfer_matrix_of_bmike53_pairs(tmp_path):
    from lm_eval_xke.reporting.plots import markdown_table, results_files, transfer_matrix

    _parallel_results(tmp_path)
    matrix = transfer_matrix(results_files(tmp_path), "bmike53_zsre", "em")
    assert matrix.rows == ("en",) and matrix.columns == ("en", "de", "fr")
    assert matrix.values["en"]["en"] == pytest.approx(0.375)  # both tasks ask in English: their sample-weighted mean
    assert "| en | 8 | 37.5 | 50.0 | 25.0 |" in markdown_table(matrix)


def test_mzsre_and_bmike53_download_into_the_cache_pinned_and_checked(data_dir, tmp_path, monkeypatch):
    """No local copy: the pinned URLs are fetched (here: served from the shared folder) and sha256-checked."""
    from lm_eval_xke import data

    monkeypatch.delenv("XKE_DATA_DIR", raising=False)
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path / "cache"))
    fetched = []

    def serve(url: str, timeout: float) -> bytes:
        fetched.append(url)
        if "ReMaKE/975a9e9069/data/MzsRE/" in url:
            return (data_dir / "mzsre" / url.rsplit("/", 1)[1]).read_bytes()
        if "MultiKnow/6e3e245bf0a17edaecfb4d71664efc1b5fb67906/data/BMIKE53/" in url:
            return (data_dir / "bmike53" / url.split("/BMIKE53/", 1)[1]).read_bytes()
        raise OSError(f"unexpected URL {url}")

    monkeypatch.setattr(data, "_fetch", serve)
    assert len(load_mzsre(["en", "cs"]).rows) == 743
    assert len(load_bmike53("counterfact", ["en", "sv"]).rows) == 1031
    assert [u.rsplit("/", 1)[1] for u in fetched] == ["mzsre_test_duplicate_encz.json", "counterfact_test_sv.json"]
    monkeypatch.setattr(data, "_fetch", lambda url, timeout: b"[]")  # a changed upstream file is refused
    with pytest.raises(data.DataNotFoundError, match="sha256"):
        load_mzsre(["en", "de"])


def test_sequential_runs_add_final_keys_and_their_cross_lingual_means():
    blocks = {lang: block("Ada", f"Ada {lang}?", f"new-{lang}") for lang in ("en", "de")}
    table = join("t", [(0, "k", blocks)], ["en", "de"], ZSRE_FIELD_MAP, {"f": {"file": "f", "sha256": "0"}})
    options = {"xke_protocol": "generate", "edit_mode": "sequential"}
    (doc,) = table_dataset(table, "en", ["en", "de"], options, "t")["test"]
    case = EditCase.from_doc(doc["xke"])
    answers = [q.answers[0] if q.phase != "final" or q.lang == "en" else "forgotten" for q in case.questions]
    scores = process_results(doc, answers)
    assert scores["reliability_de_em"] == 1.0 and scores["reliability_de_em_final"] == 0.0
    assert scores["reliability_xavg_em"] == 1.0 and scores["reliability_xavg_em_final"] == 0.0
    assert "locality_xavg_f1_final" in scores
