"""The start-up hook: zero-flag `--model xke` / `--tasks bizsre_*` with the stock lm-eval, cheaply and safely."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_interpreter_start_imports_nothing_heavy():
    out = run_python(
        """
        import sys
        from lm_eval_xke._startup import _AfterImportFinder
        heavy = [m for m in ("torch", "lm_eval", "transformers", "datasets") if m in sys.modules]
        hooks = sum(isinstance(f, _AfterImportFinder) for f in sys.meta_path)
        print(heavy, hooks)
        """
    )
    # exactly one finder although a venv runs the .pth line twice
    assert out.strip() == "[] 1"


def test_xke_registered_after_builtins_and_builtins_still_resolve():
    out = run_python(
        """
        from lm_eval.api.registry import get_model
        print(get_model("xke").__name__, get_model("hf").__name__, get_model("huggingface").__name__)
        """
    )
    assert out.split() == ["XKELM", "HFLM", "HFLM"]


def test_task_manager_indexes_xke_tasks_and_user_path_still_wins(tmp_path):
    (tmp_path / "mine.yaml").write_text("task: my_own_task\ndataset_path: json\noutput_type: generate_until\n")
    out = run_python(
        f"""
        from lm_eval.tasks import TaskManager
        tm = TaskManager(include_path={str(tmp_path)!r}, include_defaults=False)
        print(sorted(t for t in tm.all_tasks if t.startswith(("bizsre", "my_own"))))
        """
    )
    assert "bizsre_zh" in out and "bizsre_en_gen" in out and "'bizsre'" in out and "my_own_task" in out


def test_register_works_without_the_hook():
    # -S skips site-packages .pth files; the package is then found through PYTHONPATH-free sys.path editing
    import lm_eval_xke

    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    pkg_root = str(__import__("pathlib").Path(lm_eval_xke.__file__).resolve().parent.parent)
    out = run_python(
        f"""
        import sys
        sys.path[:0] = {site_dirs + [pkg_root]!r}
        import lm_eval_xke
        from lm_eval_xke._startup import _AfterImportFinder
        assert not any(isinstance(f, _AfterImportFinder) for f in sys.meta_path)
        lm_eval_xke.register()
        from lm_eval.api.registry import get_model
        print(get_model("xke").__name__, get_model("hf").__name__)
        """,
        "-S",
    )
    assert out.split() == ["XKELM", "HFLM"]
