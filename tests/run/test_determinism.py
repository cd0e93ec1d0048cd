"""The same `lm_eval` command twice gives byte-identical per-sample answers and metrics on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))
# wall-clock fields lm-eval writes, and the checkout's commit (other work may be committed between the two runs)
VARYING = ("date", "total_evaluation_time_seconds", "start_time", "end_time", "git_hash")


def run_bytes(tiny_llama_dir: Path, data_dir: Path, out: Path, editor_args: str) -> tuple[bytes, dict]:
    """The samples file's bytes and the results JSON without wall-clock fields, of one `lm_eval` run."""
    model_args = f"pretrained={tiny_llama_dir},{editor_args},journal=off"
    env = {**os.environ, "XKE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [
            LM_EVAL, "--tasks", "bizsre_en", "--model", "xke", "--model_args", model_args, "--device", "cpu",
            "--limit", "3", "--output_path", str(out), "--log_samples",
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    for key in VARYING:
        results.pop(key, None)
    for key in ("edit_seconds_total", "edit_seconds_mean"):
        results["config"]["xke"].pop(key)
    return next(out.rglob("samples_bizsre_en_*.jsonl")).read_bytes(), results


@pytest.mark.parametrize(
    "editor_args",
    [
        "editor=rome,layer=1,v_num_grad_steps=5",  # sampled context templates, gradient steps
        "editor=ike,k=4",  # retrieval of demonstrations, shuffled demonstration kinds
    ],
)
def test_the_same_command_twice_gives_identical_samples_and_metrics(tiny_llama_dir, data_dir, tmp_path, editor_args):
    first = run_bytes(tiny_llama_dir, data_dir, tmp_path / "first", editor_args)
    second = run_bytes(tiny_llama_dir, data_dir, tmp_path / "second", editor_args)
    assert first[0] == second[0]  # per-sample answers and scores, byte for byte
    assert first[1] == second[1]  # metrics and the run's configuration
    assert first[1]["config"]["xke"]["n_edit_cases"] == 3
