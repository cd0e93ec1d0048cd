"""The `xke` model's arguments: what each accepts, checked with a message that names the fix before anything is
loaded, and split into the editor's hyper-parameters, the tasks' ``xke_*`` options and the backend's arguments."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from lm_eval.models.huggingface import HFLM

from lm_eval_xke.cases import TASK_FIXED_OPTIONS, TASK_OPTION_PREFIX
from lm_eval_xke.edit_set import EDIT_SET_MODE_SEMANTICS, EditSetSpec
from lm_eval_xke.editors import Editor, EditorError, get_editor, hparam_fields, parallel_editors

#: What each edit mode does, recorded in the results ``config`` next to the mode itself.
EDIT_MODE_SEMANTICS = {
    "single": "per case: edit from the clean model, answer its questions, restore",
    "batch": "per chunk of edit_batch_size cases: one editor call for all their requests, answer them all, restore",
    "sequential": (
        "edits accumulate in dataset order; each case is answered right after its own edit (the plain metrics) and "
        "all cases again after the last edit (metrics suffixed _final); restored at the end"
    ),
}
EDIT_MODES = tuple(EDIT_MODE_SEMANTICS)
#: The order in which ``edit_mode=sequential`` applies the cases of several tasks.
EDIT_ORDER_SEMANTICS = {
    "dataset": "task after task, each in dataset order",
    "interleave": "round-robin over the tasks (first case of each task, then the second...), e.g. alternating edit "
    "languages with --tasks bizsre_en,bizsre_zh",
}
#: Appended to the semantics of a run sharded by ``accelerate launch`` (lm-eval gives process r every n-th doc).
SHARDED_SEMANTICS = (
    "; sharded over {n} processes: each edits and answers one case in {n} (doc ids equal to its rank modulo {n}), "
    "so batches form within a process's share; n_edit_cases, n_editor_calls and edit timings are process 0's"
)
BACKENDS = ("hf", "vllm")
#: ``on_edit_failure``: record a failed edit and go on from the restored model, or end the run
EDIT_FAILURE_POLICIES = ("skip", "stop")


@dataclass(frozen=True)
class ModelArgs:
    """The checked model_args of one `xke` model."""

    editor_cls: type[Editor]
    edit_mode: str
    edit_order: str
    edit_batch_size: int  # as given; only batch mode uses it
    edit_parallel: int
    seed: int
    held: tuple[EditSetSpec, str] | None  # the edit set and its mode
    backend_cls: type
    overrides: dict[str, Any]  # the editor's hyper-parameters given by name
    task_options: dict[str, Any]  # ``xke_*``
    backend_kwargs: dict[str, Any]


def parse_model_args(
    *,
    editor: str | None,
    edit_mode: str,
    edit_order: str,
    edit_batch_size: Any,
    edit_parallel: Any,
    backend: str,
    seed: Any,
    on_edit_failure: str,
    edit_set: Any,
    edit_set_mode: str | None,
    edit_set_include_path: str | None,
    kwargs: dict[str, Any],
) -> ModelArgs:
    """Check every model_arg in the order a user reads them; the first problem raises an EditorError."""
    editor = "none" if editor is None else str(editor)  # lm-eval parses the model_arg `none` to None
    if edit_mode not in EDIT_MODES:
        raise EditorError(f"edit_mode must be one of {', '.join(EDIT_MODES)}, got {edit_mode!r}")
    if edit_order not in EDIT_ORDER_SEMANTICS:
        raise EditorError(f"edit_order must be one of {', '.join(EDIT_ORDER_SEMANTICS)}, got {edit_order!r}")
    if edit_order != "dataset" and edit_mode != "sequential":
        raise EditorError(
            f"edit_order={edit_order} orders the edits of edit_mode=sequential (got edit_mode={edit_mode}), where "
            "they accumulate; in other modes every case is edited from the unedited model"
        )
    if backend not in BACKENDS:
        raise EditorError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    editor_cls = get_editor(editor)
    if edit_mode == "batch" and not editor_cls.supports_batch:
        raise no_batch(editor_cls, "edit_mode=single or edit_mode=sequential")
    edit_batch_size = int_arg("edit_batch_size", edit_batch_size, minimum=1)
    seed = int_arg("seed", seed, minimum=0)
    edit_parallel = check_edit_parallel(edit_parallel, edit_mode, editor_cls)
    if on_edit_failure not in EDIT_FAILURE_POLICIES:
        raise EditorError(f"on_edit_failure must be one of {', '.join(EDIT_FAILURE_POLICIES)}, got {on_edit_failure!r}")
    held = check_edit_set(edit_set, edit_set_mode, edit_set_include_path, editor_cls)
    backend_cls = backend_class(backend)
    overrides, task_options, backend_kwargs = split_model_args(kwargs, editor_cls, backend_cls)
    return ModelArgs(
        editor_cls=editor_cls,
        edit_mode=edit_mode,
        edit_order=edit_order,
        edit_batch_size=edit_batch_size,
        edit_parallel=edit_parallel,
        seed=seed,
        held=held,
        backend_cls=backend_cls,
        overrides=overrides,
        task_options=task_options,
        backend_kwargs=backend_kwargs,
    )


def int_arg(name: str, value: Any, minimum: int) -> int:
    """A whole-number model_arg (lm-eval turns "5" into 5 but passes "abc" on); an EditorError names it."""
    try:
        number = int(value)
        whole = not isinstance(value, bool) and number == float(value)
    except (TypeError, ValueError):
        whole = False
    if not whole or number < minimum:
        raise EditorError(f"model_arg {name} must be a whole number >= {minimum}, got {value!r}")
    return number


def check_edit_set(
    value: Any, mode: str | None, include_path: str | None, editor_cls: type[Editor]
) -> tuple[EditSetSpec, str] | None:
    """The parsed ``edit_set`` and its mode (default: batch where the editor can, else sequential), or None."""
    if value is None:
        if mode is not None or include_path is not None:
            raise EditorError("edit_set_mode and edit_set_include_path go with edit_set=<task>:<count>[:<offset>]")
        return None
    spec = EditSetSpec.parse(value)
    mode = mode or ("batch" if editor_cls.supports_batch else "sequential")
    if mode not in EDIT_SET_MODE_SEMANTICS:
        raise EditorError(f"edit_set_mode must be one of {', '.join(EDIT_SET_MODE_SEMANTICS)}, got {mode!r}")
    if mode == "batch" and not editor_cls.supports_batch:
        raise no_batch(editor_cls, "edit_set_mode=sequential")
    return spec, mode


def no_batch(editor_cls: type[Editor], instead: str) -> EditorError:
    return EditorError(
        f"editor '{editor_cls.name}' cannot edit in batch mode: {editor_cls.batch_unsupported_reason}. Use {instead}."
    )


def check_edit_parallel(value: Any, edit_mode: str, editor_cls: type[Editor]) -> int:
    """``edit_parallel`` as an int >= 1; above 1 only in single mode and for editors that can plan in parallel."""
    parallel = int_arg("edit_parallel", value, minimum=1)
    if parallel > 1 and edit_mode != "single":
        raise EditorError(
            f"edit_parallel={parallel} plans independent single-mode edits together, so it needs edit_mode=single "
            f"(got edit_mode={edit_mode}); drop edit_parallel or use edit_mode=single"
        )
    if parallel > 1 and not editor_cls.supports_parallel:
        raise EditorError(
            f"editor '{editor_cls.name}' cannot plan edits in parallel (edit_parallel={parallel}); editors that can: "
            f"{parallel_editors()}. Use edit_parallel=1."
        )
    return parallel


def backend_class(name: str) -> type:
    """The backend's class; `vllm` (an optional extra) is imported only when asked for."""
    if name == "vllm":
        from lm_eval_xke.backends.vllm import VLLMBackend

        return VLLMBackend
    from lm_eval_xke.backends.hf import HFBackend

    return HFBackend


def split_model_args(kwargs: dict[str, Any], editor_cls: type[Editor], backend_cls: type) -> tuple[dict, dict, dict]:
    """Split model_args into editor hyper-parameter overrides, ``xke_*`` task options and backend arguments."""
    hparam_names = set(hparam_fields(editor_cls.hparams_class))
    hf_names = set(inspect.signature(HFLM.__init__).parameters) - {"self", "backend", "kwargs"}
    engine_names = set(getattr(backend_cls, "engine_argument_names", frozenset)())  # `vllm`: EngineArgs fields
    backend_names = hf_names | engine_names
    overrides, task_options, backend_kwargs, unknown = {}, {}, {}, []
    for key, value in kwargs.items():
        if key in TASK_FIXED_OPTIONS:
            raise EditorError(f"model_arg '{key}' is fixed by each task (choose the task, e.g. bizsre_zh, instead)")
        if key.startswith(TASK_OPTION_PREFIX):
            task_options[key] = value
        elif key in hparam_names:
            overrides[key] = value
        elif key in backend_names:
            backend_kwargs[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise EditorError(
            f"unknown model_args for --model xke: {', '.join(sorted(unknown))}. "
            "xke arguments: editor, preset, editor_config, edit_mode, edit_order, edit_batch_size, edit_parallel, "
            "edit_set, edit_set_mode, edit_set_include_path, backend, seed, journal, on_edit_failure, xke_* task "
            "options; "
            f"hyper-parameters of editor '{editor_cls.name}': {', '.join(sorted(hparam_names)) or '(none)'}; "
            f"backend ({backend_cls.name}) arguments: {', '.join(sorted(hf_names))}"
            + (" and vLLM's EngineArgs fields" if engine_names else "")
        )
    if "pretrained" not in backend_kwargs:
        raise EditorError("--model xke needs pretrained=<model name, local folder or PreTrainedModel>")
    return overrides, task_options, backend_kwargs
