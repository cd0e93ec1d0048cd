"""Resumable runs: the journal file, resuming through the model, and a real `lm_eval` run killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance

from lm_eval_xke.cases import EditCase
from lm_eval_xke.editors import AppliedEdit, Editor, HyperParams, register_editor
from lm_eval_xke.journal import CaseEntry, Journal, JournalError, journal_enabled, journal_path, journals_dir
from lm_eval_xke.model import XKELM
from lm_eval_xke.testing import capital_city_case, loglikelihood_requests

LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))
IDENTITY = {"editor": "rome", "seed": 0}


def entry(doc_id: int) -> CaseEntry:
    answers = [(-1.5, False, '{"answer": " x"}'), (float("-inf"), True, "{}")]
    return CaseEntry("bizsre_en", doc_id, f"inputs-{doc_id}", answers, {"seconds": 0.25, "failed": None})


def written(path: Path, n: int) -> Path:
    journal = Journal(path, IDENTITY)
    for doc_id in range(n):
        journal.append([entry(doc_id)])
    journal.close()
    return path


# ---------------------------------------------------------------- the file


def test_entries_read_back_exactly(tmp_path):
    journal = Journal(written(tmp_path / "j.jsonl", 3), IDENTITY)
    assert journal.entries == {("bizsre_en", i): entry(i) for i in range(3)}  # tuples and -inf survive JSON
    assert journal.get("bizsre_en", 1, "inputs-1") == entry(1)
    assert journal.get("bizsre_en", 7, "inputs-7") is None
    with pytest.raises(JournalError, match="doc 1 with other inputs"):
        journal.get("bizsre_en", 1, "changed prompt")


@pytest.mark.parametrize("cut", [1, 20, 60])
def test_a_torn_last_line_is_dropped_and_appending_goes_on(tmp_path, cut, caplog):
    path = written(tmp_path / "j.jsonl", 3)
    path.write_bytes(path.read_bytes()[:-cut])  # killed while writing the third case
    journal = Journal(path, IDENTITY)
    assert set(journal.entries) == {("bizsre_en", 0), ("bizsre_en", 1)}
    assert "torn" in caplog.text
    journal.append([entry(2)])
    assert journal.finished == {("bizsre_en", i) for i in range(3)}
    journal.close()
    assert Journal(path, IDENTITY).entries == {("bizsre_en", i): entry(i) for i in range(3)}


def test_a_torn_header_starts_the_journal_again(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"format":1,"ident')
    Journal(path, IDENTITY).close()
    assert json.loads(path.read_text().splitlines()[0])["identity"] == IDENTITY


def test_corruption_before_the_last_line_is_an_error(tmp_path):
    path = written(tmp_path / "j.jsonl", 3)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"doc_id":1', '"doc_id":9')  # still JSON, but its checksum no longer matches
    path.write_text("".join(lines))
    with pytest.raises(JournalError, match="corrupt at line 3"):
        Journal(path, IDENTITY)


def test_another_configuration_is_refused_naming_the_field(tmp_path):
    path = written(tmp_path / "j.jsonl", 1)
    with pytest.raises(JournalError, match=r"seed: journal 0, this run 1.*delete or move the file"):
        Journal(path, {**IDENTITY, "seed": 1})


def test_two_runs_cannot_append_to_one_journal(tmp_path):
    first = Journal(tmp_path / "j.jsonl", IDENTITY)
    with pytest.raises(JournalError, match="in use by another run"):
        Journal(tmp_path / "j.jsonl", IDENTITY)
    first.close()
    Journal(tmp_path / "j.jsonl", IDENTITY).close()  # free again once the first run is done


def test_where_journals_go(tmp_path, monkeypatch):
    monkeypatch.setenv("XKE_JOURNAL_DIR", str(tmp_path / "journals"))
    assert [journal_enabled(v) for v in ("auto", "off", False, None, "OFF", str(tmp_path))] == [
        True, False, False, False, False, True,
    ]  # fmt: skip
    auto = journal_path("auto", IDENTITY)
    assert auto.parent == journals_dir() == tmp_path / "journals"
    assert journal_path("auto", {**IDENTITY, "seed": 1}) != auto  # another configuration, another file
    assert journal_path(str(tmp_path), IDENTITY) == tmp_path / auto.name  # an existing folder
    assert journal_path(str(tmp_path / "mine.jsonl"), IDENTITY) == tmp_path / "mine.jsonl"


# ---------------------------------------------------------------- resuming through the model


@dataclass
class NoHyperParams(HyperParams):
    pass


class CountingEditor(Editor):
    """A prompt editor that counts its calls: a resumed case must not be edited again."""

    name = "journal_counting"
    hparams_class = NoHyperParams
    supports_batch = True
    calls = 0

    def apply(self, model, tokenizer, requests, hparams) -> AppliedEdit:
        type(self).calls += 1
        facts = " ".join(f"{r.prompt} {r.target_new}." for r in requests)
        return AppliedEdit(prompt_transform=lambda prompt: f"{facts} {prompt}")


register_editor(CountingEditor.name, CountingEditor)


def case_requests(n: int, final: bool = False) -> list[Instance]:
    docs = [capital_city_case(f"Country{i}", "Berlin", f"The capital of Country{i} is", final) for i in range(n)]
    return [r for doc_id, doc in enumerate(docs) for r in loglikelihood_requests(doc, doc_id)]


def xke(tiny_llama_dir, journal: Path | str, **kwargs) -> XKELM:
    return XKELM(
        pretrained=str(tiny_llama_dir), device="cpu", editor=CountingEditor.name, journal=str(journal), **kwargs
    )


@pytest.mark.parametrize("mode", [{}, {"edit_mode": "batch", "edit_batch_size": 2}])
def test_finished_cases_are_answered_from_the_journal(tiny_llama_dir, tmp_path, mode):
    requests, path = case_requests(3), tmp_path / "j.jsonl"
    first = xke(tiny_llama_dir, path, **mode)
    calls = CountingEditor.calls
    whole = first.loglikelihood(requests)
    whole_calls = CountingEditor.calls - calls
    assert len(path.read_text().splitlines()) == 1 + 3

    path.write_bytes(path.read_bytes()[:-10])  # the last case's line is torn: it (and its batch) is done again
    calls = CountingEditor.calls
    resumed = xke(tiny_llama_dir, path, **mode)
    assert resumed.loglikelihood(requests) == whole
    assert CountingEditor.calls - calls == 1
    summary = resumed.get_model_info()["xke"]
    assert summary["n_editor_calls"] == whole_calls == first.get_model_info()["xke"]["n_editor_calls"]
    assert summary["journals"] == [str(path)]

    with pytest.raises(JournalError, match="seed"):  # the same file for another configuration
        xke(tiny_llama_dir, path, seed=1, **mode).loglikelihood(requests)


def test_sequential_resume_edits_finished_cases_again_without_asking_them(tiny_llama_dir, tmp_path):
    requests, path = case_requests(3, final=True), tmp_path / "j.jsonl"
    whole = xke(tiny_llama_dir, path, edit_mode="sequential").loglikelihood(requests)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]))  # killed after the first case
    asked = []
    resumed = xke(tiny_llama_dir, path, edit_mode="sequential")
    readout = resumed._readout
    resumed._readout = lambda instances, *under: asked.extend(instances) or readout(instances, *under)
    calls = CountingEditor.calls
    assert resumed.loglikelihood(requests) == whole
    assert CountingEditor.calls - calls == 3  # the later edits build on the first one
    phases = [EditCase.from_doc(r.doc["xke"]).questions[r.idx].phase for r in asked]
    # two unfinished cases (a pre and two post questions each); every case again after the last edit (two each)
    assert phases.count("pre") == 2 and phases.count("post") == 4 and phases.count("final") == 6


def test_journal_off_writes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XKE_JOURNAL_DIR", str(tmp_path / "journals"))
    lm = xke(tiny_llama_dir, "off")
    lm.loglikelihood(case_requests(1))
    assert not (tmp_path / "journals").exists() and lm.get_model_info()["xke"]["journals"] == []


# ---------------------------------------------------------------- a real run, killed and resumed


def lm_eval_command(tiny_llama_dir, journal: Path, out: Path) -> list[str]:
    model_args = f"pretrained={tiny_llama_dir},editor=rome,layer=1,v_num_grad_steps=5,journal={journal}"
    return [
        LM_EVAL, "--tasks", "bizsre_en", "--model", "xke", "--model_args", model_args, "--device", "cpu",
        "--limit", "4", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip


def cli_env(data_dir: Path) -> dict:
    return {**os.environ, "XKE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def comparable_run(out: Path) -> tuple[dict, list]:
    """The results JSON without what differs between any two runs (wall-clock times, the checkout's commit while
    other work is committed), and the logged samples."""
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    for key in ("date", "total_evaluation_time_seconds", "start_time", "end_time", "git_hash"):
        results.pop(key, None)
    for key in ("edit_seconds_total", "edit_seconds_mean"):
        results["config"]["xke"].pop(key)
    samples = [json.loads(line) for line in next(out.rglob("samples_bizsre_en_*.jsonl")).open()]
    return results, samples


def test_a_killed_lm_eval_run_resumes_to_the_same_results(tiny_llama_dir, data_dir, tmp_path):
    env, journal = cli_env(data_dir), tmp_path / "journal.jsonl"
    whole = subprocess.run(lm_eval_command(tiny_llama_dir, journal, tmp_path / "whole"), env=env, capture_output=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    journal.unlink()  # the same command again, from scratch

    command = lm_eval_command(tiny_llama_dir, journal, tmp_path / "resumed")
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= 1 + 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    finished = journal.read_bytes().count(b"\n") - 1
    assert 2 <= finished < 4, "the run was not killed part-way"

    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{finished} of 4 cases answered from it" in resumed.stderr
    assert comparable_run(tmp_path / "resumed") == comparable_run(tmp_path / "whole")


def test_code_identity_covers_borrowed_modules_and_the_version(tmp_path, monkeypatch):
    """MEMIT borrows ROME's value optimisation: changing that file (here, a copy of it) changes MEMIT's journal
    identity, so an old journal is not reused; so does another package version."""
    from lm_eval_xke import journal as journal_module
    from lm_eval_xke.editors import get_editor

    memit = type(get_editor("memit"))
    before = journal_module.code_digest(memit)
    borrowed = sys.modules["lm_eval_xke.plugins.rome.compute_v"]
    changed = tmp_path / "compute_v.py"
    changed.write_text(Path(borrowed.__file__).read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    monkeypatch.setattr(borrowed, "__file__", str(changed))
    assert journal_module.code_digest(memit) != before
    monkeypatch.undo()
    assert journal_module.code_digest(memit) == before
    monkeypatch.setattr(journal_module.metadata, "version", lambda name: "9.9.9")
    assert journal_module.code_digest(memit) != before


# ---------------------------------------------------------------- a held edit set, killed and resumed

TINY_ROME = dict(layer=1, context_template_lengths="5", context_templates_per_length=2, v_num_grad_steps=5)


def held(tiny_llama_dir, data_dir, journal: Path, **args) -> XKELM:
    return XKELM(
        pretrained=str(tiny_llama_dir), device="cpu", xke_data_file=str(data_dir), journal=str(journal),
        **{"editor": "rome", "edit_set": "bizsre_en:3:10", "edit_set_mode": "sequential", **TINY_ROME, **args},
    )  # fmt: skip


@pytest.fixture
def counted_rome(monkeypatch) -> list:
    from lm_eval_xke.plugins.rome import RomeEditor

    calls, apply = [], RomeEditor.apply
    monkeypatch.setattr(RomeEditor, "apply", lambda self, *a: calls.append(1) or apply(self, *a))
    return calls


def test_a_killed_held_edit_set_resumes_to_the_same_weights(tiny_llama_dir, data_dir, tmp_path, counted_rome):
    from lm_eval_xke.testing import parameter_hashes

    path = tmp_path / "held.jsonl"
    whole = held(tiny_llama_dir, data_dir, path)
    assert len(counted_rome) == 3 and len(path.read_text().splitlines()) == 1 + 3
    assert sorted(p.name for p in path.with_suffix(".deltas").iterdir()) == ["10.pt", "11.pt", "12.pt"]
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))  # killed after the first edit

    resumed = held(tiny_llama_dir, data_dir, path)
    assert len(counted_rome) == 3 + 2  # the first edit is added back, not computed again
    assert parameter_hashes(resumed.backend.model) == parameter_hashes(whole.backend.model)
    record, whole_record = resumed.get_model_info()["xke"]["edit_set"], whole.get_model_info()["xke"]["edit_set"]
    assert record["resumed_editor_calls"] == 1 and whole_record["resumed_editor_calls"] == 0
    assert {k: v for k, v in record.items() if k not in ("resumed_editor_calls", "seconds")} == {
        k: v for k, v in whole_record.items() if k not in ("resumed_editor_calls", "seconds")
    }
    assert len(resumed._held) == 3

    held(tiny_llama_dir, data_dir, path)  # a finished set is added back whole
    assert len(counted_rome) == 5


def test_a_held_journal_is_refused_when_its_deltas_or_weights_do_not_match(
    tiny_llama_dir, data_dir, tmp_path, monkeypatch
):
    from lm_eval_xke import edit_set

    path = tmp_path / "held.jsonl"
    held(tiny_llama_dir, data_dir, path, edit_set="bizsre_en:2:10")
    deltas = path.with_suffix(".deltas") / "11.pt"

    add = edit_set.apply_weight_deltas  # adds as another torch build might: not bit for bit
    monkeypatch.setattr(
        edit_set, "apply_weight_deltas", lambda model, ds: add(model, [replace(d, b=d.b * 1.01) for d in ds])
    )
    with pytest.raises(JournalError, match="did not give the weights that run had"):
        held(tiny_llama_dir, data_dir, path, edit_set="bizsre_en:2:10")
    monkeypatch.undo()

    deltas.write_bytes(deltas.read_bytes()[:-1] + bytes([deltas.read_bytes()[-1] ^ 0xFF]))
    with pytest.raises(JournalError, match="11.pt, the weight deltas of a journaled editor call, was changed"):
        held(tiny_llama_dir, data_dir, path, edit_set="bizsre_en:2:10")
    deltas.unlink()
    with pytest.raises(JournalError, match="is missing"):
        held(tiny_llama_dir, data_dir, path, edit_set="bizsre_en:2:10")
    with pytest.raises(JournalError, match="another configuration.*hparams"):
        held(tiny_llama_dir, data_dir, path, edit_set="bizsre_en:2:10", v_num_grad_steps=4)
