"""MLaKE through the stock `lm_eval` CLI in a subprocess, as a user runs it, then `lm-eval-xke plot transfer`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lm_eval_xke.tasks.mlake.utils import MC_METRICS, QA_METRICS

BIN = Path(sys.executable).parent
TINY_ROME = "editor=rome,layer=1,context_template_lengths=5,context_templates_per_length=5,v_num_grad_steps=5"


def run(tool: str, *args: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XKE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, env=env, timeout=600)


def test_each_task_family_with_rome_then_plot(tiny_llama_dir, data_dir, tmp_path):
    done = run(
        "lm_eval", "--tasks", "mlake_zh,mlake_mc_en,mlake_multihop_ja", "--model", "xke",
        "--model_args", f"pretrained={tiny_llama_dir},{TINY_ROME},xke_mlake_edit_lang=fr",
        "--limit", "2", "--output_path", str(tmp_path), "--log_samples",
        data_dir=data_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert {f"{m},none" for m in QA_METRICS} <= set(results["results"]["mlake_zh"])
    assert {f"{m},none" for m in MC_METRICS} <= set(results["results"]["mlake_mc_en"])
    assert {"multihop_ja_em,none", "multihop_ja_contains,none"} <= set(results["results"]["mlake_multihop_ja"])
    assert results["higher_is_better"]["mlake_zh"]["old_answer_en_contains"] is False
    xke = results["config"]["xke"]
    assert xke["editor"] == "rome" and xke["n_edit_cases"] == 6
    assert xke["protocols"] == ["generate", "teacher_forced"]
    multihop = next(d for d in xke["data"] if d["file"].startswith("mlake/multi_hop"))
    assert multihop["edit_lang"] == "fr" and multihop["unjoined"] == 0 and multihop["joined"] == 909

    samples = [json.loads(line) for line in next(tmp_path.rglob("samples_mlake_mc_en_*.jsonl")).open()]
    assert len(samples[0]["arguments"]) == 20  # 4 options x 5 languages, each one loglikelihood request
    assert all(len(r) == 3 for r in samples[0]["resps"][0])  # xke's (loglikelihood, is_greedy, read-out)
    multihop_sample = next(json.loads(line) for line in next(tmp_path.rglob("samples_mlake_multihop_ja_*")).open())
    assert multihop_sample["doc"]["xke"]["requests"][0]["lang"] == "fr"

    png = tmp_path / "matrix.png"
    plotted = run("lm-eval-xke", "plot", "transfer", str(tmp_path), "-o", str(png), data_dir=data_dir)
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert "editor rome" in plotted.stdout and "| zh | 2 |" in plotted.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_lm_eval_lists_and_validates_the_mlake_tasks(data_dir):
    listed = run("lm_eval", "ls", "tasks", data_dir=data_dir)
    assert listed.returncode == 0, listed.stderr[-2000:]
    names = [
        *("mlake", "mlake_mc", "mlake_multihop", "mlake_en", "mlake_mc_de", "mlake_multihop_zh"),
        *(
            "mzsre",
            "mzsre_gen",
            "mzsre_cs",
            "mzsre_nl_gen",
            "bmike53_zsre",
            "bmike53_wfd_gen",
            "bmike53_counterfact_ceb",
        ),
    ]
    for name in names:
        assert f"|{name} " in listed.stdout
    validated = run("lm_eval", "validate", "--tasks", "mlake,mlake_mc,mlake_multihop", data_dir=data_dir)
    assert validated.returncode == 0 and "valid" in validated.stdout + validated.stderr
