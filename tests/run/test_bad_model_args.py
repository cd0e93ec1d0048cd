"""Bad ``--model_args``: one line naming the argument and the fix, raised before any editing, never from torch.

Every case goes through lm-eval's own path (``simple_evaluate`` with a model_args string, as the CLI passes it);
one case also runs the stock ``lm_eval`` command in a subprocess, to see what the user sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from lm_eval import simple_evaluate

from lm_eval_xke.editors import EditorError

pytestmark = pytest.mark.usefixtures("one_thread")

LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))

CONFIGS = {
    "broken.yaml": "layer: [1\nv_lr: 0.5\n",
    "list.yaml": "- layer\n- 1\n",
    "unknown_key.yaml": "layr: 1\n",
    "bad_value.yaml": "layer: one\n",
}

CASES = {
    "unknown editor": ("editor=romee", r"^unknown editor 'romee'; available editors: .*\brome\b"),
    "unknown argument": ("editor=rome,layr=1", r"^unknown model_args for --model xke: layr\. .*\blayer\b"),
    "wrong type": ("editor=rome,layer=abc", r"^hyper-parameter 'layer' of editor 'rome' must be int, got 'abc'$"),
    "wrong list item": ("editor=memit,layers=4|x", r"^hyper-parameter 'layers' of editor 'memit' must be"),
    "edit_batch_size not a number": ("editor=none,edit_batch_size=many", r"^model_arg edit_batch_size must be a whole"),
    "edit_batch_size fractional": ("editor=none,edit_batch_size=1.5", r"^model_arg edit_batch_size must be a whole"),
    "seed not a number": ("editor=none,seed=abc", r"^model_arg seed must be a whole number >= 0, got 'abc'$"),
    "unknown edit_mode": ("editor=none,edit_mode=parallel", r"^edit_mode must be one of single, batch, sequential"),
    "unknown backend": ("editor=none,backend=onnx", r"^backend must be one of hf, vllm, got 'onnx'$"),
    "batch for a one-at-a-time editor": ("editor=rome,edit_mode=batch", r"^editor 'rome' cannot edit in batch mode"),
    "task-fixed option": ("editor=none,xke_edit_lang=zh", r"^model_arg 'xke_edit_lang' is fixed by each task"),
    "editor_config missing": (
        "editor=rome,editor_config={tmp}/nowhere.yaml",
        r"^editor_config file .*nowhere\.yaml does not exist: pass the path of a YAML file",
    ),
    "editor_config unparsable": (
        "editor=rome,editor_config={tmp}/broken.yaml",
        r"^editor_config file .*broken\.yaml is not valid YAML \(.*line \d+.*\); fix it or drop editor_config$",
    ),
    "editor_config not a mapping": (
        "editor=rome,editor_config={tmp}/list.yaml",
        r"^editor_config file .*list\.yaml must hold a mapping .*got list$",
    ),
    "editor_config unknown key": (
        "editor=rome,editor_config={tmp}/unknown_key.yaml",
        r"^unknown hyper-parameter\(s\) layr for editor 'rome' \(editor_config .*unknown_key\.yaml\); valid ones: ",
    ),
    "editor_config bad value": (
        "editor=rome,editor_config={tmp}/bad_value.yaml",
        r"^hyper-parameter 'layer' of editor 'rome' \(editor_config .*bad_value\.yaml\) must be int, got 'one'$",
    ),
}


@pytest.fixture
def config_dir(tmp_path) -> Path:
    for name, text in CONFIGS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def assert_no_deep_traceback(error: BaseException) -> None:
    frames = "".join(traceback.format_exception(error))
    assert "/torch/" not in frames and "/transformers/" not in frames, frames


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_model_arg_is_one_line_naming_it(name, tiny_llama_dir, config_dir, xke_tasks):
    args, expected = CASES[name]
    model_args = f"pretrained={tiny_llama_dir},device=cpu," + args.format(tmp=config_dir)
    with pytest.raises(EditorError, match=expected) as info:
        simple_evaluate(model="xke", model_args=model_args, tasks=["bizsre_en"], task_manager=xke_tasks, limit=1)
    assert "\n" not in str(info.value)
    assert_no_deep_traceback(info.value)


def test_device_and_batch_size_in_model_args_win_over_the_cli_defaults(
    tiny_llama_dir, data_dir, xke_tasks, monkeypatch
):
    """The CLI always passes device=cuda:0 and batch_size=1; naming them in model_args too is no TypeError."""
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    model_args = f"pretrained={tiny_llama_dir},device=cpu,batch_size=2,editor=none,journal=off"
    out = simple_evaluate(
        model="xke", model_args=model_args, device="cuda:0", batch_size=1, tasks=["bizsre_en"], task_manager=xke_tasks,
        limit=1,
    )  # fmt: skip
    assert "reliability_en_em,none" in out["results"]["bizsre_en"]


@pytest.mark.parametrize("traceback_wanted", [False, True], ids=["one_line", "XKE_TRACEBACK"])
def test_the_cli_user_sees_one_line(tiny_llama_dir, config_dir, data_dir, traceback_wanted):
    env = {**os.environ, "XKE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("XKE_TRACEBACK", None)
    if traceback_wanted:
        env["XKE_TRACEBACK"] = "1"
    model_args = f"pretrained={tiny_llama_dir},editor=rome,editor_config={config_dir}/broken.yaml"
    done = subprocess.run(
        [
            LM_EVAL,
            "--tasks",
            "bizsre_en",
            "--model",
            "xke",
            "--model_args",
            model_args,
            "--device",
            "cpu",
            "--limit",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode != 0
    assert "/torch/" not in done.stderr and "/transformers/" not in done.stderr
    if traceback_wanted:
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("lm_eval_xke.editors.EditorError: editor_config file ") and "broken.yaml" in last
    else:
        assert "Traceback" not in done.stderr
        assert "lm_eval: error: editor_config file " in done.stderr and "broken.yaml" in done.stderr
