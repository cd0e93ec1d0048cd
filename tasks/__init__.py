"""lm-eval task folders of lm_eval_xke (installed as ``lm_eval_xke.tasks``); the YAMLs are indexed by lm-eval."""
