"""Reading lm-eval results files: finding them, parsing them, and what every report takes from them.

The leaderboard, the plots, the side-effect comparison and the submission bundles all read results through here,
so a folder is searched the same way (recursively, following linked folders) and a model is labelled the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ResultsError(ValueError):
    """Results that cannot be read or used as asked, worded for the user."""


def find_results_files(paths: Iterable[str | Path]) -> list[Path]:
    """Results JSON files named directly or found (recursively, linked folders followed) in folders; each file once.

    Files of a folder come in path order; lm-eval stamps each name with its time, so within one output folder that
    is oldest first."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(
                Path(folder) / name
                for folder, _, names in os.walk(p, followlinks=True)
                for name in names
                if name.startswith("results_") and name.endswith(".json")
            )
            if not files:
                raise ResultsError(f"no results_*.json file under {p}: pass lm-eval's --output_path folder or files")
            found.update(dict.fromkeys(f.resolve() for f in files))
        elif p.is_file():
            found[p.resolve()] = None
        else:
            raise ResultsError(f"{p} does not exist: pass lm-eval's --output_path folder or results_*.json files")
    return list(found)


def read_results(path: Path) -> dict[str, Any]:
    """One results file's JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path} is not a readable lm-eval results JSON: {err}") from None


def xke_config(results: dict[str, Any]) -> dict[str, Any] | None:
    """What the ``xke`` model recorded (``config.xke``; lm-eval versions that nest it: ``config.model_info.xke``);
    None for a run of another model."""
    config = results.get("config") or {}
    return (config.get("model_info") or {}).get("xke") or config.get("xke")


def model_args_of(config: dict) -> dict[str, str]:
    """A results ``config``'s model_args as a dict (the CLI records the string it was given, the API a dict)."""
    args = config.get("model_args") or {}
    if isinstance(args, str):
        args = dict(part.split("=", 1) for part in args.split(",") if "=" in part)
    return {k: str(v) for k, v in args.items()}


def short_model_name(name: str) -> str:
    """Hub ids stay as they are; a local folder is shown by its last component."""
    return Path(name).name if name.startswith(("/", ".", "~")) else name


def model_label(config: dict) -> str:
    """The model a results ``config`` ran, as tables show it: ``pretrained`` from its model_args (see
    ``short_model_name``), else the lm-eval model name."""
    return short_model_name(model_args_of(config).get("pretrained", str(config.get("model", "?"))).rstrip("/"))
