"""lm_eval_xke: cross-lingual knowledge-editing evaluation on top of lm-evaluation-harness.

Importing this package is cheap (no torch, no lm_eval): it runs at every interpreter start
through the start-up hook. Heavy modules load only when the `xke` model or a task is used.
"""

__version__ = "0.1.0"


def register() -> None:
    """Make `xke` and the xke task folders known to lm-eval in this process.

    For library use (``lm_eval.simple_evaluate``) and environments where the start-up hook does
    not run (``python -S``, ``pip install --target``). Safe to call more than once.
    """
    from lm_eval_xke._startup import register_now

    register_now()
