"""Example lm_eval_xke editor plugin (see docs/plugins.md of lm_eval_xke)."""

from xke_plugin_example.editor import DownProjFineTuneEditor, DownProjFineTuneHyperParams

__all__ = ["DownProjFineTuneEditor", "DownProjFineTuneHyperParams"]
