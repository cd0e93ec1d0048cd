"""The user's commands, run as a user runs them: the stock `lm_eval` CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval import simple_evaluate

from lm_eval_xke.metrics import exact_match, token_f1
from lm_eval_xke.tasks.bizsre.utils import METRICS

LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))


def cli(*args: str, data_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "XKE_DATA_DIR": str(data_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run([LM_EVAL, *args], capture_output=True, text=True, env=env, timeout=600)


def test_lm_eval_bizsre_zh_with_rome_end_to_end(tiny_llama_dir, data_dir, tmp_path):
    done = cli(
        "--tasks", "bizsre_zh", "--model", "xke",
        "--model_args", f"pretrained={tiny_llama_dir},editor=rome,layer=1,v_num_grad_steps=10",
        "--limit", "2", "--output_path", str(tmp_path), "--log_samples",
        data_dir=data_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reliability_zh_em" in done.stdout
    results_file = next(tmp_path.rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    task = results["results"]["bizsre_zh"]
    assert {f"{m},none" for m in METRICS} <= set(task)
    assert results["higher_is_better"]["bizsre_zh"]["locality_en_f1"] is True
    xke = results["config"]["xke"]
    assert xke["editor"] == "rome" and xke["hparams"]["layer"] == 1 and xke["n_edit_cases"] == 2
    assert xke["protocols"] == ["teacher_forced"]
    assert xke["data"][0]["sha256"].startswith("01620cf1") and xke["data"][0]["f1"] == "harmonic"

    # every logged per-sample score follows from the logged read-outs and the reference definitions
    samples = [json.loads(line) for line in next(tmp_path.rglob("samples_bizsre_zh_*.jsonl")).open()]
    assert len(samples) == 2
    for sample in samples:
        questions = sample["doc"]["xke"]["questions"]
        readouts = [json.loads(r[2]) for r in sample["filtered_resps"]]
        pre = {q["lang"]: r for q, r in zip(questions, readouts, strict=True) if q["phase"] == "pre"}
        for q, r in zip(questions, readouts, strict=True):
            if q["phase"] != "post":
                continue
            gold_text, gold_ids = (
                (pre[q["lang"]]["answer"], pre[q["lang"]]["answer_ids"])
                if q["role"] == "locality"
                else (r["target"], r["target_ids"])
            )
            key = f"{q['role']}_{q['lang']}"
            assert sample[f"{key}_em"] == exact_match(r["answer"], gold_text)
            assert sample[f"{key}_f1"] == pytest.approx(token_f1(r["answer_ids"], gold_ids))


def test_lm_eval_lists_and_validates_the_tasks(data_dir):
    listed = cli("ls", "tasks", data_dir=data_dir)
    assert listed.returncode == 0, listed.stderr[-2000:]
    for name in ("bizsre", "bizsre_en", "bizsre_zh", "bizsre_gen", "bizsre_en_gen", "bizsre_zh_gen"):
        assert f"|{name} " in listed.stdout
    validated = cli("validate", "--tasks", "bizsre,bizsre_gen", data_dir=data_dir)
    assert validated.returncode == 0 and "valid" in validated.stdout + validated.stderr


def test_chat_template_and_system_instruction_are_honoured(tiny_llama_dir, data_dir, monkeypatch, xke_tasks):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    out = simple_evaluate(
        task_manager=xke_tasks,
        model="xke", model_args=f"pretrained={tiny_llama_dir},device=cpu,editor=none", tasks=["bizsre_en"],
        limit=1, log_samples=True, apply_chat_template=True, system_instruction="Answer briefly.",
    )  # fmt: skip
    sample = out["samples"]["bizsre_en"][0]
    contexts = [args[0] for args in sample["arguments"]]
    assert all(c.startswith("<|system|>Answer briefly.\n<|user|>") and c.endswith("<|assistant|>") for c in contexts)
    assert "nq question:" in contexts[6]  # locality question rendered per question, not question 0 for all
    continuations = [args[1] for args in sample["arguments"]]
    assert continuations[0] == sample["doc"]["target"]  # no joining space after the assistant tag


def test_fallback_command_and_editor_listing(data_dir):
    xke = str(Path(sys.executable).with_name("lm-eval-xke"))
    env = {**os.environ, "XKE_DATA_DIR": str(data_dir)}
    validated = subprocess.run([xke, "validate", "--tasks", "bizsre_zh"], capture_output=True, text=True, env=env)
    assert validated.returncode == 0 and "valid" in validated.stdout + validated.stderr, validated.stderr[-2000:]
    listed = subprocess.run([xke, "editors"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0
    assert "rome  (" in listed.stdout and "v_num_grad_steps = 25" in listed.stdout and "none  (" in listed.stdout
    assert "batch: no; presets: easyedit)" in listed.stdout


def test_sequential_mode_through_the_cli_reports_the_forgetting_metrics(tiny_llama_dir, data_dir, tmp_path):
    done = cli(
        "--tasks", "bizsre_en", "--model", "xke",
        "--model_args", f"pretrained={tiny_llama_dir},editor=rome,layer=1,v_num_grad_steps=3,edit_mode=sequential",
        "--limit", "2", "--output_path", str(tmp_path),
        data_dir=data_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    task = results["results"]["bizsre_en"]
    assert {f"{m},none" for m in METRICS} | {f"{m}_final,none" for m in METRICS} <= set(task)
    xke = results["config"]["xke"]
    assert xke["edit_mode"] == "sequential" and "after the last edit" in xke["edit_mode_semantics"]


@pytest.mark.parametrize(
    "editor_args, mode_args",
    [
        ("editor=memit,layers=1|2,mom2_n_tokens=1500", "edit_mode=batch,edit_batch_size=2"),
        (
            "editor=alphaedit,layers=1|2,mom2_n_tokens=1500,nullspace_threshold=1e9,update_l2=1e-4",
            "edit_mode=sequential",
        ),
    ],
)
def test_memit_family_edit_modes_through_the_cli(tiny_llama_dir, data_dir, tmp_path, editor_args, mode_args):
    small = "clamp_norm_factor=100,v_weight_decay=0,v_num_grad_steps=3,context_template_lengths=5"
    done = cli(
        "--tasks", "bizsre_en", "--model", "xke",
        "--model_args", f"pretrained={tiny_llama_dir},{editor_args},{small},{mode_args}",
        "--limit", "4", "--output_path", str(tmp_path / "out"),
        data_dir=data_dir, env={"XKE_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    xke = results["config"]["xke"]
    assert xke["n_edit_cases"] == 4 and f"edit_mode={xke['edit_mode']}" in mode_args
    # batch: two editor calls of two cases; sequential: one call per case
    assert xke["n_editor_calls"] == (2 if xke["edit_mode"] == "batch" else 4)
    assert list((tmp_path / "cache" / "stats").rglob("*.pt"))  # statistics from the en corpus, cached


def test_tool_commands_that_only_read_results_do_not_import_torch():
    """Only the invoked command's module is imported: reading results files stays fast and torch-free."""
    probe = (
        "import contextlib, io, sys\n"
        "from lm_eval_xke.cli import main\n"
        "for command in ('leaderboard', 'submission', 'verify', 'plot', 'report-plot', 'side-effects'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([command, '--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
