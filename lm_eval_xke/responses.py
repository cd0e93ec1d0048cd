"""The one encoding of a teacher-forced read-out in lm-eval's loglikelihood response.

lm-eval's response is ``(loglikelihood, is_greedy)``; the `xke` model appends the argmax read-out as a JSON string,
``(loglikelihood, is_greedy, '{"answer": ..., "target": ..., "answer_ids": [...], "target_ids": [...]}')``, so that
it survives lm-eval's sample logging (which writes response items with ``str``). The backends write it, failed edits
write a marked one, and the tasks' scorers (and ``verify``) read it, all through this module.
"""

from __future__ import annotations

import json
from typing import Any

READOUT_FIELDS = ("answer", "target", "answer_ids", "target_ids")


def readout_response(loglikelihood: float, is_greedy: bool, details: dict[str, Any]) -> tuple[float, bool, str]:
    """lm-eval's loglikelihood pair plus ``details`` (the read-out fields, and any marks) as JSON."""
    return (loglikelihood, is_greedy, json.dumps(details, ensure_ascii=False))


def has_readout(result: Any) -> bool:
    """Whether ``result`` is a loglikelihood response that carries a read-out (only `xke` returns one)."""
    return isinstance(result, (tuple, list)) and len(result) == 3 and isinstance(result[2], str)


def readout_of(result: Any) -> dict[str, Any]:
    """The read-out of a response, as a dict; a response without one is an error that says how to get one."""
    if not has_readout(result):
        raise ValueError(
            "teacher-forced edit tasks need the argmax read-out that only --model xke returns "
            "(use --model xke with editor=none for the unedited baseline)"
        )
    return json.loads(result[2])


def without_readout(result: Any) -> Any:
    """lm-eval's own response: the loglikelihood pair of a response with a read-out, anything else as it is."""
    return tuple(result[:2]) if has_readout(result) else result
