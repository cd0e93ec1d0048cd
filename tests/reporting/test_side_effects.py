"""Held edit sets (``edit_set=``) and `lm-eval-xke side-effects`: ordinary tasks on the edited model vs unedited.

The ordinary task is ``tests/tasks/mc_facts`` (16 questions in en, zh, fr, de and ja), run through the stock
``lm_eval`` CLI with ``--include_path``; the edits are real Bi-ZsRE cases from the shared data.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_xke.edit_set import EditSetSpec
from lm_eval_xke.editors import EditorError
from lm_eval_xke.model import XKELM
from lm_eval_xke.reporting.side_effects import SideEffectsError, compare, language_of, load_run
from lm_eval_xke.testing import TINY_MEMIT_HPARAMS, parameter_hashes

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = Path(sys.executable).parent
TASKS = Path(__file__).resolve().parents[1] / "tasks"
LANGS = ("de", "en", "fr", "ja", "zh")
TINY_ROME = dict(layer=1, context_template_lengths="5", context_templates_per_length=2, clamp_norm_factor=100.0,
                 v_weight_decay=0.0, v_num_grad_steps=10)  # fmt: skip


def model_args(**args) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())


def in_process(folder: Path, args: dict) -> None:
    """The CLI's code path without its ~20 s of indexing lm-eval's built-in tasks (see leaderboard_runs.py)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    tracker = EvaluationTracker(output_path=str(folder))
    manager = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=args)
    results = simple_evaluate(model="xke", model_args=args, tasks=["mc_facts"], log_samples=True,
                              evaluation_tracker=tracker, task_manager=manager)  # fmt: skip
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, data_dir, tmp_path_factory):
    """mc_facts on the tiny Llama: unedited, with 3 and 6 held MEMIT edits (one batch each) and 2 sequential ROME
    ones, samples logged. The run with 3 goes through the stock lm_eval CLI, the others through its code path."""
    root = tmp_path_factory.mktemp("side-effects")
    env = {**os.environ, "XKE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    memit = dict(editor="memit", **TINY_MEMIT_HPARAMS)
    args = dict(pretrained=str(tiny_llama_dir), device="cpu", xke_data_file=str(data_dir))
    in_process(root / "unedited", args)
    in_process(root / "held6", dict(args, **memit, edit_set="bizsre_en:6"))
    in_process(root / "rome2", dict(args, **TINY_ROME, editor="rome", edit_set="bizsre_en:2:10"))
    command = [str(BIN / "lm_eval"), "--tasks", "mc_facts", "--include_path", str(TASKS), "--model", "xke",
               "--model_args", model_args(**args, **memit, edit_set="bizsre_en:3"), "--output_path",
               str(root / "held3"), "--log_samples"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: root / name for name in ("unedited", "held3", "held6", "rome2")}


def results_of(folder: Path) -> dict:
    return json.loads(next(folder.rglob("results_*.json")).read_text())


def loglikelihoods(folder: Path, lang: str) -> list[float]:
    samples = next(folder.rglob(f"samples_mc_facts_{lang}_*.jsonl"))
    return [float(r[0][0]) for line in samples.open() for r in json.loads(line)["resps"]]


def per_question_acc(folder: Path, lang: str) -> dict[int, float]:
    samples = next(folder.rglob(f"samples_mc_facts_{lang}_*.jsonl"))
    return {row["doc_id"]: row["acc"] for row in map(json.loads, samples.open())}


def test_held_edits_answer_every_ordinary_task_and_are_recorded(runs, tiny_llama_dir):
    base, held = results_of(runs["unedited"]), results_of(runs["held3"])
    xke = held["config"]["xke"]
    record = xke["edit_set"]
    assert record["task"] == "bizsre_en" and record["count"] == 3 and record["offset"] == 0
    assert record["mode"] == "batch" and record["n_held"] == 3 and record["n_failed"] == 0
    assert record["data"][0]["file"] == "bizsre_test.json" and record["data"][0]["sha256"].startswith("01620cf1")
    assert xke["editor"] == "memit" and xke["n_editor_calls"] == 1
    assert xke["weights"] == base["config"]["xke"]["weights"]  # the same unedited model underneath
    assert base["config"]["xke"]["edit_set"] is None
    six = results_of(runs["held6"])["config"]["xke"]["edit_set"]
    assert six["weights_edited"] != record["weights_edited"] and six["cases_sha256"] != record["cases_sha256"]
    for lang in LANGS:  # every language's answers come from the edited model
        assert loglikelihoods(runs["held3"], lang) != loglikelihoods(runs["unedited"], lang)
    rome = results_of(runs["rome2"])["config"]["xke"]
    assert rome["edit_set"]["mode"] == "sequential" and rome["edit_set"]["offset"] == 10
    assert rome["n_editor_calls"] == 2 and rome["hparams"]["layer"] == 1


def test_side_effects_table_csv_and_plots(runs, tmp_path):
    command = [str(BIN / "lm-eval-xke"), "side-effects", "--metric", "acc", str(runs["held3"]), str(runs["unedited"])]
    shown = subprocess.run([*command, "--plot", str(tmp_path / "bars.png")], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "3 held; editor memit, bizsre_en from case 0, batch" in shown.stdout
    base, held = results_of(runs["unedited"])["results"], results_of(runs["held3"])["results"]
    for lang in LANGS:
        before, after = base[f"mc_facts_{lang}"]["acc,none"], held[f"mc_facts_{lang}"]["acc,none"]
        assert f"| mc_facts | {lang} | acc,none | {before:.4f} | {after:.4f} | {after - before:+.4f} ±" in shown.stdout
    assert (tmp_path / "bars.png").stat().st_size > 1000

    growth = subprocess.run(
        [*command, str(runs["held6"]), "--format", "csv", "--plot", str(tmp_path / "growth.png")],
        capture_output=True,
        text=True,
    )
    assert growth.returncode == 0, growth.stderr
    table = list(csv.DictReader(io.StringIO(growth.stdout.split("plot:")[0])))
    assert {(r["lang"], r["held_edits"]) for r in table} == {(lang, n) for lang in (*LANGS, "all") for n in "36"}
    row = next(r for r in table if r["lang"] == "zh" and r["held_edits"] == "6")
    held6 = results_of(runs["held6"])["results"]["mc_facts_zh"]["acc,none"]
    assert float(row["delta"]) == pytest.approx(held6 - base["mc_facts_zh"]["acc,none"], abs=1e-4)
    # paired: every run logged its samples, so the error is that of the mean per-question difference
    after, before = (per_question_acc(runs[name], "zh") for name in ("held6", "unedited"))
    differences = [after[doc] - before[doc] for doc in before]
    mean = sum(differences) / len(differences)
    se = (sum((d - mean) ** 2 for d in differences) / (len(differences) - 1) / len(differences)) ** 0.5
    assert float(row["delta_stderr"]) == pytest.approx(se, abs=1e-4)
    assert "paired" in shown.stdout
    assert (tmp_path / "growth.png").stat().st_size > 1000


def rewritten(folder: Path, tmp_path: Path, change) -> Path:
    results = results_of(folder)
    change(results)
    path = tmp_path / f"results_{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(results))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["config"].update(limit=5), "--limit"),
        (lambda r: r["versions"].update(mc_facts_en=2.0), "task versions of mc_facts_en"),
        (lambda r: r["n-shot"].update(mc_facts_zh=5), "few-shot settings of mc_facts_zh"),
        (lambda r: r["config"]["xke"].update(weights="0" * 64), "the model"),
    ],
)
def test_side_effects_refuses_runs_that_are_not_comparable(runs, tmp_path, change, message):
    edited = rewritten(runs["held3"], tmp_path, change)
    with pytest.raises(SideEffectsError, match=message):
        compare([load_run(runs["unedited"]), load_run(edited)])


def test_an_unedited_run_of_plain_lm_eval_is_compared_by_checkpoint(runs, tmp_path):
    hf = rewritten(runs["unedited"], tmp_path, lambda r: r["config"].pop("xke"))  # as --model hf writes it
    assert compare([load_run(hf), load_run(runs["held3"])]).rows
    elsewhere = rewritten(
        runs["unedited"],
        tmp_path,
        lambda r: (r["config"].pop("xke"), r["config"]["model_args"].update(pretrained="/other")),
    )
    with pytest.raises(SideEffectsError, match="the model"):
        compare([load_run(elsewhere), load_run(runs["held3"])])


def test_side_effects_needs_one_unedited_run_and_one_edit_set(runs):
    with pytest.raises(SideEffectsError, match="exactly one run without an edit set"):
        compare([load_run(runs["held3"]), load_run(runs["held6"])])
    with pytest.raises(SideEffectsError, match="hold different edit sets or editors"):
        compare([load_run(runs["unedited"]), load_run(runs["held3"]), load_run(runs["rome2"])])


def test_language_of_task_names():
    assert language_of("xnli_zh") == ("xnli", "zh")
    assert language_of("belebele_zho_Hans") == ("belebele", "zho_Hans")
    assert language_of("mc_facts_ja") == ("mc_facts", "ja")
    assert language_of("hellaswag") == ("hellaswag", "-")
    assert language_of("arc_easy") == ("arc_easy", "-")


@pytest.fixture(scope="module")
def held_lm(tiny_llama_dir, data_dir):
    return XKELM(
        pretrained=str(tiny_llama_dir), device="cpu", editor="memit", edit_set="bizsre_en:2",
        xke_data_file=str(data_dir), **TINY_MEMIT_HPARAMS,
    )  # fmt: skip


def test_held_weights_are_the_unedited_ones_plus_the_deltas(held_lm, tiny_llama_dir):
    clean = XKELM(pretrained=str(tiny_llama_dir), device="cpu")
    (edit,) = held_lm._held
    assert edit.deltas and not edit.restored
    for delta in edit.deltas:
        expected = (clean.backend.model.get_parameter(delta.parameter).float() + delta.dense()).to(torch.float32)
        assert torch.equal(held_lm.backend.model.get_parameter(delta.parameter), expected)
    touched = {d.parameter for d in edit.deltas}
    held, unedited = parameter_hashes(held_lm.backend.model), parameter_hashes(clean.backend.model)
    assert {name for name in held if held[name] != unedited[name]} == touched
    plain = [Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 0, ("plain", 0, 1))]
    assert held_lm.loglikelihood(plain)[0] != clean.loglikelihood(plain)[0]  # answered on the edited weights


def test_edit_tasks_are_refused_beside_a_held_set(held_lm):
    from lm_eval_xke.testing import capital_city_case, loglikelihood_requests

    with pytest.raises(EditorError, match="edit tasks t would edit on top of them"):
        held_lm.loglikelihood(loglikelihood_requests(capital_city_case(), 0))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(edit_set="bizsre_en"), r"<task>:<count>\[:<offset>\]"),
        (dict(edit_set="bizsre_en:0"), "at least 1"),
        (dict(edit_set="bizsre_en:x"), "edit_set=bizsre_zh:100:200"),
        (dict(edit_set_mode="batch"), "go with edit_set"),
        (dict(edit_set="bizsre_en:2", edit_set_mode="stacked"), "edit_set_mode must be one of batch, sequential"),
        (dict(editor="rome", edit_set="bizsre_en:2", edit_set_mode="batch"), "Use edit_set_mode=sequential"),
        (dict(edit_set="no_such_task:2"), "not an edit task of lm_eval_xke"),
        (dict(edit_set="bizsre_en:5:1035"), "bizsre_en has 1037 cases"),
        (dict(editor="ike", edit_set="bizsre_en:1"), "edits the prompt of each question, not the model"),
    ],
)
def test_bad_edit_set_arguments_are_explained(tiny_llama_dir, data_dir, args, message):
    with pytest.raises(EditorError, match=message):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", xke_data_file=str(data_dir), **args)


def test_edit_set_spec_round_trip():
    assert EditSetSpec.parse("mlake_en:100:5") == EditSetSpec("mlake_en", 100, 5)
    assert str(EditSetSpec.parse("bizsre_zh:10")) == "bizsre_zh:10:0"
