"""Causal tracing (`lm-eval-xke trace`): where the MLPs carry a subject's facts, the layers MEMIT is told to edit."""

from __future__ import annotations

import pytest

from lm_eval_xke.causal_trace import Trace, causal_trace, subject_span
from lm_eval_xke.cli import main
from lm_eval_xke.testing import load_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [("Where is the Eiffel Tower located?", "Eiffel Tower"), ("Who founded Zyxwv Corp?", "Zyxwv Corp")]


def test_the_subject_span_covers_the_subjects_tokens(tiny):
    _, tokenizer = tiny
    ids, first, last = subject_span(tokenizer, "Where is the Eiffel Tower located?", "Eiffel Tower")
    # the byte-level tokenizer: <s>, then one token per byte
    assert (first, last) == (1 + len("Where is the "), len("Where is the Eiffel Tower"))
    assert tokenizer.decode(ids[first : last + 1]) == "Eiffel Tower"


def test_without_noise_nothing_is_corrupted_and_nothing_recovered(tiny):
    model, tokenizer = tiny
    trace = causal_trace(model, tokenizer, PROMPTS, samples=2, noise=0.0)
    assert trace.corrupted == pytest.approx(trace.clean, abs=1e-6) and trace.noise_std == 0.0
    assert trace.effects == pytest.approx([0.0] * model.config.num_hidden_layers, abs=1e-6)


def test_windows_are_centred_on_the_block_and_cut_at_the_ends(tiny_llama_dir):
    model, tokenizer = load_tiny(tiny_llama_dir)
    single = causal_trace(model, tokenizer, PROMPTS, samples=4, noise=3.0, window=1, seed=1)
    assert single.corrupted != pytest.approx(single.clean, abs=1e-9) and single.prompts == 2
    # the last block's MLP at a subject token feeds no later attention: restoring it alone cannot reach the prediction
    assert single.effects[3] == pytest.approx(0.0, abs=1e-12) and 0.0 not in single.effects[:3]
    wide = causal_trace(model, tokenizer, PROMPTS, samples=4, noise=3.0, window=8, seed=1)
    assert wide.window == 4  # the window fits the model
    # blocks 0, 1, 2, 3 restore 0..1, 0..2, 0..3, 1..3: 1 and 2 differ by the last block only
    assert wide.effects[1] == pytest.approx(wide.effects[2], abs=1e-12) and wide.effects[0] != wide.effects[1]


def test_the_suggested_layers_are_the_window_with_the_largest_summed_effect():
    trace = Trace([0.0, 0.1, 0.5, 0.4, 0.3, 0.0, 0.2], 0.9, 0.1, 2, 3, 1.0)
    assert trace.best_window(3) == [2, 3, 4] and trace.best_window(1) == [2] and trace.best_window(99) == list(range(7))


def test_the_trace_command_prints_the_effects_and_the_layers(tiny_llama_dir, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    assert main(["trace", "--pretrained", str(tiny_llama_dir), "--limit", "2", "--samples", "2", "--size", "2"]) == 0
    out = capsys.readouterr().out
    assert "causal trace of" in out and "2 Bi-ZsRE en prompts" in out and "over 1 blocks" in out
    assert out.count("\n    ") == 4 and "largest summed effect over 2 blocks: layers=" in out


def test_layers_auto_edits_where_the_trace_points_and_is_traced_once(tiny_llama_dir, data_dir, monkeypatch, tmp_path):
    from lm_eval_xke import causal_trace as tracing
    from lm_eval_xke.model import XKELM

    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(tracing.AUTO_SETTINGS, "limit", 3)  # a cheap trace: 3 prompts, 2 corruptions each
    monkeypatch.setitem(tracing.AUTO_SETTINGS, "samples", 2)
    args = dict(pretrained=str(tiny_llama_dir), device="cpu", editor="memit", xke_data_file=str(data_dir))
    lm = XKELM(**args, layers="auto")
    traced = lm.get_model_info()["xke"]["traced_layers"]["layers"]
    default = XKELM(**args).hparams.layers  # 0-1 on the 4-block Llama: two blocks, so auto picks two
    assert len(traced["layers"]) == len(default) == 2 and lm.hparams.layers == traced["layers"]
    expected = Trace(traced["effects"], 0.0, 0.0, traced["window"], 3, 0.0).best_window(2)
    assert traced["layers"] == expected and "3 Bi-ZsRE en test prompts" in traced["prompts"]

    def no_second_trace(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(tracing, "causal_trace", no_second_trace)
    assert XKELM(**args, layers="auto").hparams.layers == traced["layers"]  # from the cache
