"""ROME on a real pretrained model (SmolLM2-135M-Instruct, from its PyPI package) with real Bi-ZsRE edits."""

from __future__ import annotations

from lm_eval import simple_evaluate

# EasyEdit's LLaMA-7B defaults stop after 25 value steps; on SmolLM2 two of these ten multi-token targets need
# more (reliability EM 0.8 at 25 steps, 1.0 at 40 in this session's sweep, with the plain-prompt early stop)
STEPS = 40


def test_rome_edits_smollm2_on_five_english_bizsre_cases(smollm2_dir, data_dir, monkeypatch, xke_tasks):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    out = simple_evaluate(
        task_manager=xke_tasks,
        model="xke",
        model_args=f"pretrained={smollm2_dir},dtype=float32,device=cpu,editor=rome,v_num_grad_steps={STEPS}",
        tasks=["bizsre_en"],
        limit=5,  # five, not ten: the default test run stays under 15 minutes (ten measured: EM 1.0)
    )
    scores = out["results"]["bizsre_en"]
    summary = {k: round(v, 3) for k, v in scores.items() if k.endswith(",none")}
    print("ROME on SmolLM2-135M-Instruct, 5 Bi-ZsRE en edits, teacher-forced:", summary)
    assert scores["reliability_en_em,none"] >= 0.8, summary
    assert scores["locality_en_em,none"] >= 0.8, summary
    assert out["config"]["xke"]["n_edit_cases"] == 5


def test_memit_batch_edits_smollm2_on_five_english_bizsre_cases(smollm2_dir, data_dir, monkeypatch):
    """MEMIT's default layers 4-8, statistics from 20k tokens of English Wikipedia, lambda 0.3 x width.

    At the default 1.36 x width (EasyEdit's LLaMA-7B ratio) the update leaves 6-19 % of the wanted residual change
    undelivered on these five edits and 3 of 5 targets land; at 0.3 x width 2-7 % and 4 of 5 (this session).
    """
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    model_args = {
        "pretrained": str(smollm2_dir), "dtype": "float32", "device": "cpu", "editor": "memit",
        "edit_mode": "batch", "edit_batch_size": 5, "mom2_n_tokens": 20000, "lambda_per_width": 0.3,
    }  # fmt: skip
    out = simple_evaluate(
        task_manager=TaskManager(include_defaults=False, metadata=model_args),
        model="xke",
        model_args=",".join(f"{k}={v}" for k, v in model_args.items()),
        tasks=["bizsre_en"],
        limit=5,
    )
    scores = out["results"]["bizsre_en"]
    summary = {k: round(v, 3) for k, v in scores.items() if k.endswith(",none")}
    print("MEMIT on SmolLM2-135M-Instruct, one batch of 5 Bi-ZsRE en edits, teacher-forced:", summary)
    # measured 0.8 / 0.8 (unedited: 0.0 reliability); one case of margin for thread-count float noise
    assert scores["reliability_en_em,none"] >= 0.6, summary
    assert scores["locality_en_em,none"] >= 0.6, summary
    assert out["config"]["xke"]["n_editor_calls"] == 1
