"""Data-parallel runs: ``accelerate launch -m lm_eval --model xke`` shards the edit cases over processes.

lm-eval gives process ``r`` of ``n`` the docs ``r, r+n, r+2n, ...`` and merges the per-doc metrics and samples on
process 0. In single-edit mode every case starts from the clean model, so the merged results must equal a
single-process run's. The test runs two CPU processes (gloo) on a tiny model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval import simple_evaluate

from lm_eval_xke.editors import EditorError
from lm_eval_xke.model import XKELM

pytestmark = pytest.mark.usefixtures("one_thread")

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
LIMIT = 4  # two cases per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_processes(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """``accelerate launch`` of two processes on CPU: the torch.distributed launcher (``--multi_gpu``) with
    ``ACCELERATE_USE_CPU=1``, so that each process's Accelerator joins a gloo process group."""
    command = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "lm_eval", *args,
    ]  # fmt: skip
    env = {**os.environ, **env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def by_doc(samples: list[dict]) -> dict[int, dict]:
    return {s["doc_id"]: s for s in samples}


def test_two_processes_merge_to_the_single_process_results(tiny_llama_dir, data_dir, tmp_path, monkeypatch, xke_tasks):
    model_args = f"pretrained={tiny_llama_dir},editor=rome,layer=1,v_num_grad_steps=3"
    # fresh journals: answers read back from an earlier run's journal would hide what these runs compute
    env = {
        "XKE_DATA_DIR": str(data_dir),
        "XKE_JOURNAL_DIR": str(tmp_path / "journals"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    done = launch_two_cpu_processes(
        ["--tasks", "bizsre_en", "--model", "xke", "--model_args", model_args, "--device", "cpu",
         "--limit", str(LIMIT), "--output_path", str(tmp_path / "out"), "--log_samples"],
        env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Building contexts for bizsre_en on rank 1" in done.stderr
    (results_file,) = (tmp_path / "out").rglob("results_*.json")  # written once, by process 0
    sharded = json.loads(results_file.read_text())
    sharded_samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_bizsre_en_*.jsonl")).open()]

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    single = simple_evaluate(
        model="xke",
        model_args=f"{model_args},device=cpu",
        tasks=["bizsre_en"],
        task_manager=xke_tasks,
        limit=LIMIT,
        log_samples=True,
    )

    assert sharded["results"]["bizsre_en"] == single["results"]["bizsre_en"]
    assert sharded["n-samples"] == single["n-samples"]
    merged, alone = by_doc(sharded_samples), by_doc(single["samples"]["bizsre_en"])
    assert sorted(merged) == sorted(alone) == list(range(LIMIT))
    for doc_id, sample in alone.items():
        other = merged[doc_id]
        assert {m: other[m] for m in sample["metrics"]} == {m: sample[m] for m in sample["metrics"]}
        # the argmax read-outs agree exactly, the loglikelihoods to float precision
        assert [r[2] for r in other["filtered_resps"]] == [r[2] for r in sample["filtered_resps"]]
        logged = [float(r[0]) for r in other["filtered_resps"]]  # the samples file holds them as text
        assert logged == pytest.approx([float(r[0]) for r in sample["filtered_resps"]])

    xke = sharded["config"]["xke"]
    assert xke["world_size"] == 2 and single["config"]["xke"]["world_size"] == 1
    assert xke["n_edit_cases"] == LIMIT // 2  # process 0 edited only its own share
    assert "sharded over 2 processes" in xke["edit_mode_semantics"]


@pytest.fixture
def two_processes(monkeypatch):
    """An ``xke`` model that believes it is one of two processes (the plumbing itself is tested above)."""
    monkeypatch.setattr(XKELM, "world_size", property(lambda self: 2))


def test_sequential_mode_is_refused_when_sharded(tiny_llama_dir, two_processes):
    with pytest.raises(EditorError, match=r"^edit_mode=sequential cannot be sharded over 2 processes: .* one process"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="none", edit_mode="sequential")


def test_batch_mode_sharded_says_batches_form_within_a_share(tiny_llama_dir, two_processes):
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="none", edit_mode="batch", edit_batch_size=2)
    xke = lm.get_model_info()["xke"]
    assert xke["world_size"] == 2
    assert xke["edit_mode_semantics"].startswith("per chunk of edit_batch_size cases")
    assert "sharded over 2 processes" in xke["edit_mode_semantics"]
    assert "batches form within a process's share" in xke["edit_mode_semantics"]
