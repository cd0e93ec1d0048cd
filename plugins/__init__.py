"""Built-in editor plugins, one sub-package per editing method (installed as ``lm_eval_xke.plugins``)."""
