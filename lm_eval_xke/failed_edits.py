"""Failed edits: how the `xke` model detects them and the answers it records for their questions.

An edit fails when the editor raises (other than an :class:`~lm_eval_xke.editors.EditorError`, which is a
configuration problem and ends the run) or leaves non-finite numbers behind: in its weight deltas, in the
parameters it names, or in the losses of its ``info``. The model is restored and every question asked after
the edit gets a *failed answer*, which the tasks score as the worst value of every metric: 0, locality included
(a failed edit is not credited with leaving unrelated facts alone), and 1 where lower is better (MLaKE's
``old_answer_*``: the old answer is still given).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lm_eval_xke.editors import AppliedEdit
from lm_eval_xke.responses import has_readout, readout_of, readout_response

#: key of a teacher-forced read-out, and prefix of a generated answer, that mark a failed edit's answer
FAILED_EDIT_MARK = "xke_failed_edit"


def failed_answer(request_type: str, arguments: tuple, reason: str) -> Any:
    """The answer recorded for a question of a failed edit, shaped like the backend's answers of that type."""
    if request_type == "loglikelihood":
        readout = {"answer": "", "target": arguments[1], "answer_ids": [], "target_ids": [], FAILED_EDIT_MARK: reason}
        return readout_response(-math.inf, False, readout)
    return f"[{FAILED_EDIT_MARK}: {reason}]"


def is_failed_answer(result: Any) -> bool:
    """Whether ``result`` (a generated string, or xke's ``(loglikelihood, is_greedy, read-out JSON)``) is one."""
    if isinstance(result, str):
        return result.startswith(f"[{FAILED_EDIT_MARK}: ")
    if has_readout(result):
        return f'"{FAILED_EDIT_MARK}"' in result[2] and FAILED_EDIT_MARK in readout_of(result)
    return False


def non_finite_reason(model, edit: AppliedEdit) -> str | None:
    """Why ``edit`` left non-finite numbers behind, or ``None``. Reads only the deltas' factors, the parameters
    the edit names (``deltas`` and ``info["parameters"]``) and the numbers in ``info``: cheap next to an edit."""
    for delta in edit.deltas:
        if not (_finite(delta.a) and _finite(delta.b)):
            return f"non-finite weight delta for {delta.parameter}"
    named = [d.parameter for d in edit.deltas] + [p for p in edit.info.get("parameters", ()) if isinstance(p, str)]
    for name in dict.fromkeys(named):
        try:
            param = model.get_parameter(name)
        except AttributeError:
            continue  # info names a module or a parameter of another model (a memory editor's side network)
        if not _finite(param):
            return f"non-finite values in the edited parameter {name}"
    path = _non_finite_number(edit.info, "info")
    return None if path is None else f"non-finite {path} reported by the editor"


def _finite(tensor) -> bool:
    import torch  # here: the tasks import this module for is_failed_answer only

    return bool(torch.isfinite(tensor).all())


def _non_finite_number(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinite number inside ``value`` (dicts, lists, floats, scalar tensors)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path}={value}"
    if hasattr(value, "is_floating_point") and value.numel() == 1 and value.is_floating_point():  # a scalar tensor
        return None if math.isfinite(value.item()) else f"{path}={value.item()}"
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite_number(item, f"{path}.{key}")
        if found is not None:
            return found
    return None
