"""`lm-eval-xke leaderboard` and `report-plot` on results files of real tiny-model runs of the stock CLI."""

from __future__ import annotations

import csv
import io
import json

import pytest
from leaderboard_runs import tiny_runs

from lm_eval_xke.cli import main
from lm_eval_xke.reporting.leaderboard import LeaderboardError, leaderboard


@pytest.fixture(scope="session")
def runs(tiny_llama_dir, data_dir, tmp_path_factory):
    return tiny_runs(tiny_llama_dir, data_dir, tmp_path_factory.getbasetemp())


def _csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_rows_per_model_editor_language_protocol_in_paper_order(runs):
    text = leaderboard([runs["none"], runs["rome"]], fmt="csv", split_by=["protocol"])
    rows = _csv_rows(text.split("\n\n")[0])
    keys = {(r["editor"], r["edit_lang"], r["protocol"]) for r in rows}
    assert keys == {(editor, lang, "teacher_forced") for editor in ("none", "rome") for lang in ("en", "zh")}
    header = list(rows[0])
    stems = ["rel", "gen_en", "gen_zh", "loc_en", "loc_zh", "port_en", "port_zh", "rel_tgt"]
    assert header[6:] == [f"{s}_{m}" for s in stems for m in ("em", "f1")]
    assert all(r["n_bizsre"] == "2/1037*" for r in rows)  # sample counts, --limit marked

    # the zh row's "rel" is reliability asked in zh, its "rel_tgt" reliability asked in en
    results = json.loads(next(runs["rome"].rglob("results_*.json")).read_text())["results"]["bizsre_zh"]
    zh = next(r for r in rows if r["editor"] == "rome" and r["edit_lang"] == "zh")
    assert float(zh["rel_f1"]) == pytest.approx(100 * results["reliability_zh_f1,none"], abs=1e-4)
    assert float(zh["rel_tgt_f1"]) == pytest.approx(100 * results["reliability_en_f1,none"], abs=1e-4)


def test_generation_rows_go_to_their_own_table(runs):
    text = leaderboard([runs["none"]], fmt="md", split_by=["protocol"])
    assert "### protocol=teacher_forced" in text and "### protocol=generate" in text
    assert "| none | en | generate | harmonic | 2/1037* |" in text
    assert "--limit" in text


def test_refuses_to_mix_protocols_f1_formulas_and_data_files(runs):
    with pytest.raises(LeaderboardError, match="would mix protocols.*--split-by protocol"):
        leaderboard([runs["none"]])
    with pytest.raises(LeaderboardError, match="rel_f1 would mix F1 formulas: harmonic .* legacy_pr"):
        leaderboard([runs["rome"], runs["legacy_f1"]])
    with pytest.raises(LeaderboardError, match=r"rel_em would mix data files \(sha256\): 01620cf1"):
        leaderboard([runs["rome"], runs["other_data"]])
    with pytest.raises(LeaderboardError, match="two runs for tiny-llama.*/none/en/teacher_forced both report"):
        leaderboard([runs["none"], runs["legacy_f1"]], split_by=["protocol"])
    # split on request instead of refusing
    split = leaderboard([runs["rome"], runs["legacy_f1"], runs["other_data"]], split_by=["f1", "data"])
    assert split.count("### f1=") == 3


def test_sort_formats_and_cli(runs, tmp_path, capsys):
    paths = [str(runs["rome"]), str(runs["legacy_f1"])]
    ranked = _csv_rows(leaderboard(paths, fmt="csv", sort="loc_zh_f1", split_by=["f1"]).split("\n\n")[0])
    values = [float(r["loc_zh_f1"]) for r in ranked]
    assert values == sorted(values, reverse=True)
    latex = leaderboard([runs["rome"]], fmt="latex")
    assert "\\begin{tabular}" in latex and "rel\\_tgt\\_em" in latex
    assert "<th>gen_zh_f1</th>" in leaderboard([runs["rome"]], fmt="html")
    with pytest.raises(LeaderboardError, match="cannot sort by 'nope'; columns: model, editor"):
        leaderboard([runs["rome"]], sort="nope")

    out = tmp_path / "board.md"
    assert main(["leaderboard", str(runs["rome"]), "--sort", "rel_em", "--out", str(out)]) == 0
    assert out.read_text().startswith("| model | editor | edit_lang | protocol |")
    assert main(["leaderboard", *paths]) == 2
    assert "F1 formulas" in capsys.readouterr().err


def test_mlake_tasks_add_per_language_columns(runs, tmp_path):
    """Any task named mlake* contributes its metrics as columns (made from a real results file)."""
    results = json.loads(next(runs["rome"].rglob("results_*.json")).read_text())
    results["results"] = {"mlake_en": {"reliability_en_em,none": 0.5, "reliability_de_contains,none": 0.25}}
    results["configs"] = {"mlake_en": {"metadata": {"xke_edit_lang": "en", "xke_protocol": "teacher_forced"}}}
    results["n-samples"] = {"mlake_en": {"original": 2, "effective": 2}}
    results["config"]["limit"] = None
    (tmp_path / "results_mlake.json").write_text(json.dumps(results))
    rows = _csv_rows(leaderboard([runs["rome"], tmp_path / "results_mlake.json"], fmt="csv"))
    en = next(r for r in rows if r["edit_lang"] == "en")
    assert en["mlake:reliability_de_contains"] == "25.0000" and en["n_mlake"] == "2"
    assert list(en)[-2:] == ["mlake:reliability_de_contains", "mlake:reliability_en_em"]


def test_report_plots_write_pngs(runs, tmp_path):
    pytest.importorskip("matplotlib")
    for kind in ("bars", "gap"):
        out = tmp_path / f"{kind}.png"
        assert (
            main(["report-plot", kind, str(runs["none"]), str(runs["rome"]), "--metric", "f1", "--out", str(out)]) == 0
        )
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
