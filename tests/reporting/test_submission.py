"""Submission bundles of real tiny-model runs: a good bundle verifies, tampered ones are rejected."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from leaderboard_runs import tiny_runs

from lm_eval_xke.cli import main
from lm_eval_xke.reporting.submission import SubmissionError, make_bundle, verify_bundle


@pytest.fixture(scope="session")
def runs(tiny_llama_dir, data_dir, tmp_path_factory):
    return tiny_runs(tiny_llama_dir, data_dir, tmp_path_factory.getbasetemp())


def _rewrite(bundle: Path, out: Path, name: str, edit, update_manifest: bool = True) -> Path:
    """Copy ``bundle`` to ``out`` with ``edit(text) -> text`` applied to one member (and its manifest sha256)."""
    with zipfile.ZipFile(bundle) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    files[name] = edit(files[name].decode()).encode()
    if update_manifest:
        manifest = json.loads(files["manifest.json"])
        manifest["sha256"][name] = hashlib.sha256(files[name]).hexdigest()
        files["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(out, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)
    return out


def _edit_json(text: str, change) -> str:
    data = json.loads(text)
    change(data)
    return json.dumps(data)


def _edit_first_sample(text: str, change) -> str:
    lines = text.splitlines()
    lines[0] = _edit_json(lines[0], change)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def bundle(runs, tmp_path_factory) -> Path:
    return make_bundle(runs["none"], tmp_path_factory.mktemp("bundle") / "none.zip")


def test_bundle_holds_everything_and_verifies(bundle, runs, tmp_path, capsys):
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        editor = json.loads(zf.read("editor.json"))
    assert names == {"manifest.json", "results.json", "editor.json", "samples/bizsre_en.jsonl",
                     "samples/bizsre_zh.jsonl", "samples/bizsre_en_gen.jsonl"}  # fmt: skip
    assert manifest["data"][0]["sha256"].startswith("01620cf1") and manifest["limit"] == 2
    assert {"python", "lm_eval", "lm_eval_xke", "torch", "transformers"} <= set(manifest["packages_bundle"])
    assert editor["editor"] == "none" and editor["hparams"] == {}
    report = verify_bundle(bundle)
    assert any("bizsre_en_gen: 2 samples, 32 per-sample scores recomputed, 16 aggregates match" in r for r in report)

    rome = make_bundle(runs["rome"], tmp_path / "rome.zip")
    assert main(["verify", str(rome)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {rome}")
    with zipfile.ZipFile(rome) as zf:
        assert json.loads(zf.read("editor.json"))["hparams"]["v_num_grad_steps"] == 5


def test_tampered_aggregate_is_rejected(bundle, tmp_path, capsys):
    def inflate(results: dict) -> None:
        results["results"]["bizsre_zh"]["reliability_zh_em,none"] = 0.99

    bad = _rewrite(bundle, tmp_path / "bad.zip", "results.json", lambda t: _edit_json(t, inflate))
    with pytest.raises(SubmissionError, match="bizsre_zh reliability_zh_em: the bundle reports 0.99"):
        verify_bundle(bad)
    assert main(["verify", str(bad)]) == 1
    assert "REJECTED" in capsys.readouterr().err


def test_tampered_per_sample_score_is_rejected_against_the_readouts(bundle, tmp_path):
    def flip(sample: dict) -> None:
        sample["reliability_en_em"] = 1.0 - sample["reliability_en_em"]

    bad = _rewrite(bundle, tmp_path / "bad.zip", "samples/bizsre_en.jsonl", lambda t: _edit_first_sample(t, flip))
    with pytest.raises(SubmissionError, match="bizsre_en doc 0 reliability_en_em"):
        verify_bundle(bad)

    def flip_generation(sample: dict) -> None:  # the logged generation now is the gold answer, its score 0
        sample["filtered_resps"][0] = sample["doc"]["xke"]["questions"][0]["answers"][0]

    bad = _rewrite(bundle, tmp_path / "gen.zip", "samples/bizsre_en_gen.jsonl",
                   lambda t: _edit_first_sample(t, flip_generation))  # fmt: skip
    with pytest.raises(SubmissionError, match="bizsre_en_gen doc 0 reliability_en_em: the bundle reports 0.0"):
        verify_bundle(bad)


def test_file_changed_without_the_manifest_is_rejected(bundle, tmp_path):
    bad = _rewrite(bundle, tmp_path / "bad.zip", "editor.json", lambda t: t.replace("none", "rome"), False)
    with pytest.raises(SubmissionError, match="editor.json does not match its sha256"):
        verify_bundle(bad)
    bad = _rewrite(
        bundle, tmp_path / "hp.zip", "editor.json", lambda t: _edit_json(t, lambda d: d.update(hparams={"x": 1}))
    )
    with pytest.raises(SubmissionError, match="editor.json disagrees with the editor and hyper-parameters"):
        verify_bundle(bad)


def test_run_without_samples_is_refused(runs, tmp_path):
    run = shutil.copytree(runs["legacy_f1"], tmp_path / "run")
    for f in run.rglob("samples_*.jsonl"):
        f.unlink()
    with pytest.raises(SubmissionError, match="no per-sample log samples_bizsre_en_.*rerun with --log_samples"):
        make_bundle(run, tmp_path / "x.zip")
    assert main(["submission", str(run), "-o", str(tmp_path / "x.zip")]) == 2
