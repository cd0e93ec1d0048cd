"""Start-up hook: teach the stock `lm_eval` command about `--model xke` and the xke tasks.

lm-eval 0.4.13 discovers no plugins. `lm_eval_xke.pth` in site-packages calls :func:`install`
at every interpreter start. It imports nothing heavy: it puts a finder on ``sys.meta_path``
that waits for lm-eval's own modules and acts right after they have executed:

- after ``lm_eval.models`` (which fills the model registry with the built-ins; registering
  earlier would hide them, because ``get_model`` imports the built-ins only into an empty
  registry) it registers ``xke`` as a lazy ``"module:attr"`` target, so torch loads only when used;
- after ``lm_eval.tasks.manager`` it makes ``TaskManager`` prepend our task folder to
  ``include_path``, so a user's own ``--include_path`` still wins.

The hook must never raise (site.py would print a traceback at every start) and must be
idempotent (in a venv the .pth line runs twice).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable

MODEL_NAME = "xke"
MODEL_TARGET = "lm_eval_xke.model:XKELM"


def tasks_dir() -> str:
    """Folder of the installed task YAMLs (``tasks/`` in the source tree), found without importing it."""
    spec = importlib.util.find_spec("lm_eval_xke.tasks")
    return list(spec.submodule_search_locations)[0]


#: errors that describe the user's input (records, model_args, data, corpus, journal), not a bug in the code
USER_ERRORS = frozenset(
    {
        "lm_eval_xke.editors.EditorError",
        "lm_eval_xke.data.RecordError",
        "lm_eval_xke.data.DataNotFoundError",
        "lm_eval_xke.stats.CorpusError",
        "lm_eval_xke.journal.JournalError",
        "lm_eval_xke.tasks.mlake.utils.DerivationError",
    }
)


def is_user_error(error: BaseException) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERRORS for cls in type(error).__mro__)


def one_line_user_errors() -> None:
    """Print an uncaught input error as one line, not a traceback through lm-eval (``XKE_TRACEBACK=1``: the
    traceback). Other exceptions keep the previous hook."""
    previous = sys.excepthook
    if getattr(previous, "_xke", False):
        return

    def hook(kind, error, traceback):
        if is_user_error(error) and not os.environ.get("XKE_TRACEBACK"):
            print(f"lm_eval: error: {error}\n(set XKE_TRACEBACK=1 for the traceback)", file=sys.stderr)
        else:
            previous(kind, error, traceback)

    hook._xke = True
    sys.excepthook = hook


def register_model(models_module=None) -> None:
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)
    one_line_user_errors()  # lm-eval is being used in this process: its users get our input errors as one line


def patch_task_manager(manager_module=None) -> None:
    if manager_module is None:
        import lm_eval.tasks.manager as manager_module
    if hasattr(manager_module, "discover_plugin_task_paths"):
        return  # a newer lm-eval discovers the `lm_eval.tasks` entry point itself
    manager_cls = manager_module.TaskManager
    if getattr(manager_cls.__init__, "_xke_patched", False):
        return
    original_init = manager_cls.__init__

    def __init__(self, verbosity=None, include_path=None, *args, **kwargs):
        if include_path is None:
            user_paths = []
        elif isinstance(include_path, (list, tuple)):
            user_paths = list(include_path)
        else:
            user_paths = [include_path]
        original_init(self, verbosity, [tasks_dir(), *user_paths], *args, **kwargs)

    __init__._xke_patched = True
    manager_cls.__init__ = __init__


AFTER_IMPORT: dict[str, Callable] = {
    "lm_eval.models": register_model,
    "lm_eval.tasks.manager": patch_task_manager,
}


class _AfterImportFinder:
    """Finds nothing itself; wraps the real loader of the watched modules to run a callback after them."""

    def find_spec(self, fullname, path=None, target=None):
        callback = AFTER_IMPORT.get(fullname)
        if callback is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            try:
                callback(module)
            except Exception:  # never break lm-eval's import because of us
                pass

        # shadow the method on this one loader instance; loaders are per module
        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called from ``lm_eval_xke.pth`` at interpreter start."""
    try:
        if any(isinstance(f, _AfterImportFinder) for f in sys.meta_path):
            return
        for name, callback in AFTER_IMPORT.items():
            if name in sys.modules:  # already imported (unusual at start-up): act now
                callback(sys.modules[name])
        sys.meta_path.insert(0, _AfterImportFinder())
    except Exception:
        pass


def register_now() -> None:
    """Eager registration for library use; imports lm_eval."""
    import lm_eval.models  # noqa: F401  (fills the registry with the built-ins first)
    import lm_eval.tasks.manager

    register_model()
    patch_task_manager(lm_eval.tasks.manager)
