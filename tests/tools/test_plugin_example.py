"""The plugin kit: the example editor package, installed next to lm_eval_xke, runs through the stock `lm_eval`
CLI; its own tests pass; the template task folder runs as a task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval import simple_evaluate

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "xke-plugin-example"
TEMPLATE = REPO / "templates" / "task_template"
LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory, data_dir) -> dict[str, str]:
    """Environment in which the example package is installed (pip --target, outside the shared venv)."""
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(EXAMPLE)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(target.glob("xke_plugin_example-*.dist-info/entry_points.txt"))
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "XKE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}  # fmt: skip


def test_installed_plugin_is_listed_and_runs_through_lm_eval(plugin_env, tiny_llama_dir, tmp_path):
    listed = subprocess.run([sys.executable, "-m", "lm_eval_xke", "editors"], capture_output=True, text=True,
                            env=plugin_env, timeout=300)  # fmt: skip
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "ft_down  (xke_plugin_example.editor.DownProjFineTuneEditor; batch: yes)" in listed.stdout

    model_args = f"pretrained={tiny_llama_dir},editor=ft_down,layer=2,steps=5,max_norm_ratio=0.2"
    args = ["--tasks", "bizsre_en", "--model", "xke", "--limit", "1", "--output_path", str(tmp_path),
            "--model_args", model_args]  # fmt: skip
    done = subprocess.run([LM_EVAL, *args], capture_output=True, text=True, env=plugin_env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    xke = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["config"]["xke"]
    assert xke["editor"] == "ft_down" and xke["n_edit_cases"] == 1
    assert xke["hparams"] == {**xke["hparams"], "layer": 2, "steps": 5, "max_norm_ratio": 0.2, "rank": 4}


def test_example_package_own_tests_pass(plugin_env):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          capture_output=True, text=True, env=plugin_env, cwd=EXAMPLE, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout


def test_task_template_runs_as_a_task(tiny_llama_dir):
    out = simple_evaluate(
        model="xke", model_args=f"pretrained={tiny_llama_dir},device=cpu,editor=none", tasks=["mybench_en"],
        task_manager=_task_manager(), limit=2, log_samples=True,
    )  # fmt: skip
    scores = out["results"]["mybench_en"]
    assert {"reliability_en_em,none", "generality_en_f1,none", "locality_en_em,none"} <= set(scores)
    assert scores["locality_en_em,none"] == 1.0  # editor=none: the answers after the edit equal those before
    assert out["config"]["xke"]["data"][0]["file"] == "sample.json"


def _task_manager():
    from lm_eval.tasks import TaskManager

    import lm_eval_xke

    lm_eval_xke.register()
    return TaskManager(include_path=str(TEMPLATE))
