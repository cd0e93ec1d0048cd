"""MLaKE: loaders on the real files, edit derivation, scoring, and the plot command."""

from __future__ import annotations

import json

import pytest

from lm_eval_xke.data import MLAKE_LANGS, RecordError, load_mlake, mlake_file
from lm_eval_xke.metrics import contains_match, normalize_answer, normalized_em
from lm_eval_xke.reporting.plots import markdown_table, plot_heatmap, transfer_matrix
from lm_eval_xke.tasks.mlake import utils

MULTIHOP_ROWS = {"en": 1024, "zh": 789, "ja": 909, "fr": 701, "de": 731}
MULTIHOP_EDITS = {"en": 656, "zh": 575, "ja": 614, "fr": 514, "de": 514}


# ---------------------------------------------------------------- loaders on the real files


@pytest.mark.parametrize("lang", MLAKE_LANGS)
def test_single_hop_files_load_with_pinned_hashes(data_dir, lang):
    for kind in ("single_qa", "single_mcqa"):
        data = load_mlake(kind, lang, data_dir)
        assert len(data.records) == 1072 and not data.skipped
        assert data.sha256 == mlake_file(kind, lang).sha256


def test_single_hop_docs_align_five_languages_and_derive_every_edit(data_dir):
    docs = utils.load_dataset(xke_edit_lang="ja", xke_data_file=str(data_dir))["test"]
    assert len(docs) == 1072
    source = docs[0]["xke"]["source"]
    assert source["skipped_invalid"] == 0 and source["underivable_indices"] == []
    assert sum(source["edit_rules"].values()) == 1072
    questions = docs[0]["xke"]["questions"]
    assert [q["lang"] for q in questions] == list(MLAKE_LANGS)
    assert questions[1]["answers"][0] == "英国广播公司" and questions[0]["answers"][0] == "BBC"
    request = docs[0]["xke"]["requests"][0]
    assert request["prompt"] == "カール・セーガンは、" and request["target_new"] == "英国放送協会"
    assert docs[0]["old_answers"]["en"][:2] == ["Cornell University", "Cornell"]


@pytest.mark.parametrize("lang", MLAKE_LANGS)
def test_multihop_join_statistics(data_dir, lang):
    docs = utils.load_multihop_dataset(xke_mlake_test_lang=lang, xke_data_file=str(data_dir))["test"]
    source = docs[0]["xke"]["source"]
    assert source["questions_in_file"] == MULTIHOP_ROWS[lang] == source["joined"] == len(docs)
    assert source["unjoined"] == 0 and source["distinct_edits"] == MULTIHOP_EDITS[lang]


def test_multihop_edit_language_is_chosen_and_unjoined_are_counted(data_dir, tmp_path):
    docs = utils.load_multihop_dataset(xke_mlake_test_lang="zh", xke_mlake_edit_lang="de", xke_data_file=data_dir)
    first = docs["test"][0]
    assert first["edit_index"] == 0 and first["xke"]["requests"][0]["lang"] == "de"
    assert first["xke"]["requests"][0]["target_new"] == "BBC"
    # a copy of the data whose first zh question names an edit that does not exist
    for rel in ("single_hop/qa/en_qa.json", "single_hop/qa/de_qa.json", "multi_hop/qa/new_zh_qa.json"):
        target = tmp_path / "mlake" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((data_dir / "mlake" / rel).read_bytes())
    broken = tmp_path / "mlake" / "multi_hop/qa/new_zh_qa.json"
    rows = json.loads(broken.read_text(encoding="utf-8"))
    rows[3]["e_prompt"] = "No such edit."
    broken.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    docs = utils.load_multihop_dataset(xke_mlake_test_lang="zh", xke_mlake_edit_lang="de", xke_data_file=tmp_path)
    source = docs["test"][0]["xke"]["source"]
    assert source["unjoined"] == 1 and source["unjoined_indices"] == [3] and len(docs["test"]) == 788


def test_mc_docs_have_four_options_per_language(data_dir):
    docs = utils.load_mc_dataset(xke_edit_lang="en", xke_data_file=str(data_dir))["test"]
    assert len(docs) == 1072
    doc = docs[0]
    assert len(doc["xke"]["questions"]) == 4 * len(MLAKE_LANGS)
    assert doc["mc_keys"][0] == {"lang": "en", "new": 1, "old": 3}
    assert doc["target"] == "Carl Sagan worked at BBC during his career."


def test_invalid_records_raise_with_index_or_are_skipped(tmp_path):
    rows = [{"question": "Q?", "e_prompt": "X is Y.", "e_answer": "Y", "e_answer_aliases": []}, {"question": ""}]
    path = tmp_path / "new_en_qa.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(RecordError, match="record 1"):
        load_mlake("multi_qa", "en", path)
    data = load_mlake("multi_qa", "en", path, skip_invalid=True)
    assert [i for i, _ in data.records] == [0] and data.skipped[0].index == 1


# ---------------------------------------------------------------- edit derivation


def _record(o_prompt: str, e_prompt: str, e_answer: str, question: str = "") -> dict:
    return {"o_prompt": o_prompt, "e_prompt": e_prompt, "e_answer": e_answer, "question": question or "Q?"}


def test_edit_prompt_ends_before_the_new_answer_and_holds_the_subject():
    record = _record(
        "Carl Sagan worked at Cornell University during his career.",
        "Carl Sagan worked at BBC during his career.",
        "BBC",
        "Where did Carl Sagan work during his career?",
    )
    edit = utils.derive_edit(record, "en", 0)
    assert (edit.request.prompt, edit.request.subject, edit.rule) == (
        "Carl Sagan worked at",
        "Carl Sagan",
        "before_answer",
    )


def test_edit_falls_back_to_common_prefix_then_to_the_question():
    inflected = _record("Er lebt in Berlin.", "Er lebt in Paris.", "Pariser")
    assert utils.derive_edit(inflected, "de", 3).rule == "common_prefix"
    assert utils.derive_edit(inflected, "de", 3).request.prompt == "Er lebt in"
    first = _record(
        "England is where football began.", "Italy is where football began.", "Italy", "Where did football begin?"
    )
    edit = utils.derive_edit(first, "en", 4)
    assert edit.rule == "question" and edit.request.prompt == "Where did football begin?"
    assert edit.request.subject == "football"


def test_cjk_subject_is_the_shared_character_run():
    record = _record(
        "カール・セーガンは、コーネル大学で勤務していました。",
        "カール・セーガンは、英国放送協会で勤務していました。",
        "英国放送協会",
        "カール・セーガンが関わった教育機関は何ですか？",
    )
    assert utils.derive_edit(record, "ja", 0).request.subject == "カール・セーガン"


def test_underivable_record_is_reported_with_its_index():
    with pytest.raises(utils.DerivationError, match="record 7"):
        utils.derive_edit(_record("", "Paris", "Paris", " "), "en", 7)


# ---------------------------------------------------------------- normalisation and matching, per language


@pytest.mark.parametrize(
    ("lang", "pred", "golds", "em", "contains"),
    [
        ("en", "The BBC.", ["BBC"], 1.0, 1.0),
        ("en", "He worked at the BBC in London", ["BBC"], 0.0, 1.0),
        ("en", "It is Rome.", ["Italy", "IT"], 0.0, 0.0),  # a 2-letter alias never matches by containment
        ("en", "it", ["Italy", "IT"], 1.0, 0.0),
        ("en", "Italian food", ["Ita"], 0.0, 0.0),  # whole words only
        ("zh", "英国广播公司。", ["英国广播公司"], 1.0, 1.0),
        ("zh", "他在英国广播公司工作", ["英国广播公司"], 0.0, 1.0),
        ("zh", "ＢＢＣ", ["BBC"], 1.0, 1.0),  # full-width forms
        ("ja", "英国放送協会です。", ["英国放送協会", "BBC"], 0.0, 1.0),
        ("ja", "ｲｷﾞﾘｽ", ["イギリス"], 1.0, 1.0),  # half-width katakana (NFKC)
        ("fr", "à l'Italie", ["Italie"], 0.0, 1.0),
        ("fr", "Université Cornell !", ["université Cornell"], 1.0, 1.0),
        ("de", "Er stammt aus Italien.", ["Italien"], 0.0, 1.0),
        ("de", "ITALIEN", ["Italien"], 1.0, 1.0),
    ],
)
def test_em_and_contains_per_language(lang, pred, golds, em, contains):
    assert normalized_em(pred, golds, lang) == em
    assert contains_match(pred, golds, lang) == contains


def test_normalisation_examples():
    assert normalize_answer("  Ｃｏｒｎｅｌｌ　University ", "en") == "cornell university"
    assert normalize_answer("「東京」", "ja") == "東京"
    assert normalize_answer("Straße", "de") == "strasse"


# ---------------------------------------------------------------- scoring


def test_qa_scoring_reports_new_and_old_answers(data_dir):
    doc = utils.load_dataset(xke_edit_lang="en", xke_data_file=data_dir)["test"][0]
    scores = utils.process_results(doc, ["BBC", "康奈尔大学", "It was the BBC", "l'université Cornell", "?"])
    assert set(scores) == set(utils.QA_METRICS)
    assert scores["reliability_en_em"] == 1.0 and scores["old_answer_zh_em"] == 1.0
    assert scores["reliability_ja_contains"] == 1.0  # "BBC" is an alias of 英国放送協会
    assert scores["old_answer_fr_contains"] == 1.0 and scores["reliability_de_em"] == 0.0


def test_mc_scoring_takes_the_highest_loglikelihood(data_dir):
    doc = utils.load_mc_dataset(xke_edit_lang="en", xke_data_file=data_dir)["test"][0]
    results = []
    for key in doc["mc_keys"]:  # the model prefers the new option, except in zh where it keeps the old one
        best = key["old"] if key["lang"] == "zh" else key["new"]
        results += [(-1.0 if k == best else -5.0, False, "{}") for k in range(4)]
    scores = utils.process_mc_results(doc, results)
    assert set(scores) == set(utils.MC_METRICS)
    assert scores["reliability_en_acc"] == 1.0 and scores["reliability_zh_acc"] == 0.0
    assert scores["old_answer_zh_acc"] == 1.0


# ---------------------------------------------------------------- plot


def _results_file(path, editor: str, values: dict[str, float]) -> None:
    results = {
        f"mlake_{edit}": {f"reliability_{test}_contains,none": values[edit] for test in MLAKE_LANGS} for edit in values
    }
    n_samples = {task: {"effective": 20} for task in results}
    config = {"model_args": {"pretrained": "/m/qwen", "editor": editor}, "xke": {"editor": editor}}
    path.write_text(json.dumps({"results": results, "n-samples": n_samples, "config": config}))


def test_transfer_matrix_table_and_png(tmp_path):
    _results_file(tmp_path / "results_2024-01-01.json", "rome", {"en": 0.5, "zh": 0.25})
    _results_file(tmp_path / "results_2024-01-02.json", "rome", {"zh": 0.75})  # newer file wins
    from lm_eval_xke.reporting.plots import results_files

    matrix = transfer_matrix(results_files(tmp_path))
    assert matrix.values["zh"]["ja"] == 0.75 and matrix.values["en"]["en"] == 0.5
    table = markdown_table(matrix)
    assert "editor rome, model qwen" in table and "| zh | 20 | 75.0 |" in table and "| de | – | – |" in table
    png = plot_heatmap(matrix, tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_follows_linked_folders_and_explains_a_missing_path(tmp_path, capsys):
    from lm_eval_xke.cli import main

    run = tmp_path / "runs" / "rome_en" / "model"
    run.mkdir(parents=True)
    _results_file(run / "results_2024-01-01.json", "rome", {"en": 0.5})
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    (gathered / "en").symlink_to(tmp_path / "runs" / "rome_en", target_is_directory=True)
    assert main(["plot", "transfer", str(gathered), "-o", str(tmp_path / "m.png")]) == 0
    assert "| en | 20 | 50.0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="empty_dir_that_is_missing does not exist: pass .*--output_path"):
        main(["plot", "transfer", str(tmp_path / "empty_dir_that_is_missing")])
