"""Faulty edits: an editor that raises or leaves non-finite numbers fails that edit only; failures score 0."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance

from lm_eval_xke.cases import EditCase, EditRequest, Question
from lm_eval_xke.data import MCQA_LETTERS
from lm_eval_xke.editors import (
    AppliedEdit,
    Editor,
    EditorError,
    HyperParams,
    WeightDelta,
    apply_weight_deltas,
    register_editor,
)
from lm_eval_xke.failed_edits import failed_answer, is_failed_answer
from lm_eval_xke.journal import Journal
from lm_eval_xke.model import XKELM
from lm_eval_xke.tasks.bizsre.utils import process_results as bizsre_scores
from lm_eval_xke.tasks.mlake.utils import process_mc_results, process_multihop_results
from lm_eval_xke.tasks.mlake.utils import process_results as process_qa_results
from lm_eval_xke.testing import capital_city_case, loglikelihood_requests, parameter_hashes

EDITED = "model.layers.0.mlp.down_proj.weight"


@dataclass
class FaultHyperParams(HyperParams):
    fault: str = "raise"  # raise | nan_delta | nan_loss | dirty_raise | config
    bad_subject: str = "Country1"  # "*": every edit fails


class FaultyEditor(Editor):
    """A rank-one weight editor that fails, in the way ``fault`` says, on the requests about ``bad_subject``."""

    name = "test_faulty"
    hparams_class = FaultHyperParams
    supports_batch = True

    def apply(self, model, tokenizer, requests, hparams) -> AppliedEdit:
        rows, cols = model.get_parameter(EDITED).shape
        b, a = torch.full((rows, 1), 0.01), torch.ones(1, cols)
        bad = any(hparams.bad_subject in ("*", r.subject) for r in requests) and hparams.fault
        if bad == "raise":
            raise RuntimeError("singular matrix")
        if bad == "config":
            raise EditorError("layer 99 does not exist")
        if bad == "dirty_raise":
            with torch.no_grad():
                model.get_parameter(EDITED).add_(1.0)
            raise RuntimeError("half-way")
        if bad == "nan_delta":
            b = b * float("nan")
        loss = float("nan") if bad == "nan_loss" else 0.5
        return apply_weight_deltas(model, [WeightDelta(EDITED, b, a)], info={"final_loss": loss})


register_editor(FaultyEditor.name, FaultyEditor)


def case_requests(n: int, final: bool = False) -> list[Instance]:
    docs = [capital_city_case(f"Country{i}", "Berlin", f"The capital of Country{i} is", final) for i in range(n)]
    return [r for doc_id, doc in enumerate(docs) for r in loglikelihood_requests(doc, doc_id)]


def phase(request: Instance) -> str:
    return EditCase.from_doc(request.doc["xke"]).questions[request.idx].phase


@pytest.fixture(scope="module")
def clean_answers(tiny_llama_dir):
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor=FaultyEditor.name, bad_subject="-", journal="off")
    return lm.loglikelihood(case_requests(3))


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("raise", "RuntimeError: singular matrix"),
        ("nan_delta", f"non-finite weight delta for {EDITED}"),
        ("nan_loss", "non-finite info.final_loss=nan reported by the editor"),
    ],
)
def test_a_failed_edit_is_recorded_and_the_next_case_starts_clean(tiny_llama_dir, clean_answers, fault, reason):
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor=FaultyEditor.name, fault=fault, journal="off")
    before = parameter_hashes(lm.backend.model)
    requests = case_requests(3)
    out = lm.loglikelihood(requests)
    assert parameter_hashes(lm.backend.model) == before
    for i, request in enumerate(requests):
        if request.doc_id == 1 and phase(request) == "post":
            assert is_failed_answer(out[i]) and reason in out[i][2] and out[i][0] == float("-inf")
        else:  # the other cases, and the failed case's questions before its edit, as if nothing had failed
            assert out[i] == clean_answers[i]
    summary = lm.get_model_info()["xke"]
    assert summary["n_failed_edits"] == 1 and summary["n_editor_calls"] == 3
    assert summary["failed_edits"] == [{"task": "t", "doc_id": 1, "reason": reason}]


def test_a_failed_batch_fails_each_of_its_cases(tiny_llama_dir, clean_answers):
    lm = XKELM(
        pretrained=str(tiny_llama_dir),
        device="cpu",
        editor=FaultyEditor.name,
        edit_mode="batch",
        edit_batch_size=2,
        journal="off",
    )
    requests = case_requests(3)
    out = lm.loglikelihood(requests)
    assert [is_failed_answer(o) for o in out] == [r.doc_id in (0, 1) and phase(r) == "post" for r in requests]
    assert out[6:] == clean_answers[6:]  # the next batch edits the clean model
    summary = lm.get_model_info()["xke"]
    assert summary["n_failed_edits"] == 2 and summary["n_editor_calls"] == 2


def test_an_editor_that_raises_half_way_through_ends_the_run(tiny_llama_dir):
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor=FaultyEditor.name, fault="dirty_raise")
    with pytest.raises(EditorError, match="left the model's weights changed") as raised:
        lm.loglikelihood(case_requests(2))
    assert str(raised.value.__cause__) == "half-way"


def test_a_configuration_error_ends_the_run(tiny_llama_dir):
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor=FaultyEditor.name, fault="config", journal="off")
    with pytest.raises(EditorError, match="layer 99"):
        lm.loglikelihood(case_requests(2))


def test_sequential_skip_leaves_the_failed_edit_out(tiny_llama_dir):
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor=FaultyEditor.name, edit_mode="sequential")
    before = parameter_hashes(lm.backend.model)
    requests = case_requests(3, final=True)
    out = lm.loglikelihood(requests)
    assert parameter_hashes(lm.backend.model) == before
    failed = [is_failed_answer(o) for o in out]
    assert failed == [r.doc_id == 1 and phase(r) != "pre" for r in requests]  # post and final questions of case 1
    assert lm.get_model_info()["xke"]["n_failed_edits"] == 1


def test_sequential_stop_restores_the_model_and_keeps_finished_cases(tiny_llama_dir, tmp_path):
    path = tmp_path / "j.jsonl"
    lm = XKELM(
        pretrained=str(tiny_llama_dir),
        device="cpu",
        editor=FaultyEditor.name,
        edit_mode="sequential",
        on_edit_failure="stop",
        journal=str(path),
    )
    before = parameter_hashes(lm.backend.model)
    with pytest.raises(EditorError, match=r"t doc 1 failed \(RuntimeError: singular matrix\); on_edit_failure=stop"):
        lm.loglikelihood(case_requests(3, final=True))
    assert parameter_hashes(lm.backend.model) == before
    assert set(Journal(path, json.loads(path.read_text().splitlines()[0])["identity"]).entries) == {("t", 0)}


def test_on_edit_failure_is_checked(tiny_llama_dir):
    with pytest.raises(EditorError, match="on_edit_failure must be one of skip, stop"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", on_edit_failure="ignore")


# ---------------------------------------------------------------- scoring: a failed edit is a failure everywhere


def readout(answer: str) -> tuple:
    details = {"answer": answer, "target": answer, "answer_ids": [7], "target_ids": [7]}
    return (-1.0, True, json.dumps(details))


@pytest.mark.parametrize("protocol", ["teacher_forced", "generate"])
def test_bizsre_scores_a_failed_edit_zero_locality_included(protocol):
    ask = dict(lang="en", answers=("x",), protocol=protocol)
    questions = (
        Question("locality", prompt="loc", phase="pre", **ask),
        Question("reliability", prompt="rel", **ask),
        Question("locality", prompt="loc", **ask),
    )
    case = EditCase("c", (EditRequest("rel", "rel", "x", "en"),), questions, {"f1": "harmonic"})
    doc = {"xke": case.to_doc()}
    kind = "loglikelihood" if protocol == "teacher_forced" else "generate_until"
    answered = readout("x") if kind == "loglikelihood" else "x"
    assert set(bizsre_scores(doc, [answered] * 3).values()) == {1.0}  # the same answers, not failed: all pass
    failed = failed_answer(kind, ("rel", " x"), "RuntimeError: boom")
    assert set(bizsre_scores(doc, [answered, failed, failed]).values()) == {0.0}


def test_mlake_scores_a_failed_edit_worst():
    case = EditCase("c", (EditRequest("q", "q", "x", "en"),), (Question("multihop", "en", "q", ("x",)),))
    failed = failed_answer("generate_until", ("q", {}), "boom")
    assert set(process_multihop_results({"xke": case.to_doc()}, [failed]).values()) == {0.0}
    doc = {"mc_keys": [{"lang": "en", "new": 0, "old": 1}]}
    failed_ll = [failed_answer("loglikelihood", ("q", f" {letter}"), "boom") for letter in MCQA_LETTERS]
    # old_answer_*: lower is better, so a failed edit scores 1 there
    assert process_mc_results(doc, failed_ll) == {"reliability_en_acc": 0.0, "old_answer_en_acc": 1.0}
    qa = EditCase("c", (EditRequest("q", "q", "x", "en"),), (Question("reliability", "en", "q", ("x",)),))
    qa_doc = {"xke": qa.to_doc(), "old_answers": {"en": ["y"]}}
    assert process_qa_results(qa_doc, ["x"])["reliability_en_em"] == 1.0  # not failed: scored as usual
    assert process_qa_results(qa_doc, [failed]) == {
        "reliability_en_em": 0.0, "reliability_en_contains": 0.0,
        "old_answer_en_em": 1.0, "old_answer_en_contains": 1.0,
    }  # fmt: skip


def test_failed_edits_in_a_real_evaluation(tiny_llama_dir, xke_tasks, data_dir, monkeypatch):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    out = simple_evaluate(
        task_manager=xke_tasks,
        model="xke",
        model_args=f"pretrained={tiny_llama_dir},device=cpu,editor={FaultyEditor.name},bad_subject=*,journal=off",
        tasks=["bizsre_en"],
        limit=2,
    )
    scores = {k: v for k, v in out["results"]["bizsre_en"].items() if k.endswith(("_em,none", "_f1,none"))}
    assert scores and set(scores.values()) == {0.0}
    assert out["config"]["xke"]["n_failed_edits"] == 2
