"""The `xke` model: per-case scheduling, exact restoration, pass-through, and argument errors."""

from __future__ import annotations

import json

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from lm_eval_xke.cases import EditCase, with_final_phase
from lm_eval_xke.editors import AppliedEdit, Editor, EditorError, HyperParams, register_editor
from lm_eval_xke.model import XKELM
from lm_eval_xke.testing import capital_city_case, loglikelihood_requests, parameter_hashes


def first_token_edited(response: tuple) -> bool:
    return json.loads(response[2])["answer"].startswith(" ")


# A random model's MLP outputs are tiny (||v_init|| ~ 0.02): without decay and with a loose clamp ROME can move them.
TINY_ROME = dict(
    layer=1, context_template_lengths=5, context_templates_per_length=5, clamp_norm_factor=100.0, v_weight_decay=0.0
)


@pytest.fixture(scope="module")
def rome_lm(tiny_llama_dir):
    return XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="rome", **TINY_ROME)


def test_edit_lands_and_restore_is_bit_exact(rome_lm):
    before = parameter_hashes(rome_lm.backend.model)
    docs = [capital_city_case("Ruritania", "Berlin"), capital_city_case("Freedonia", "Tokyo")]
    requests = [r for i, d in enumerate(docs) for r in loglikelihood_requests(d, i)]
    unedited = rome_lm.backend.readout([r.args for r in requests])
    assert not any(first_token_edited(u.as_response()) for u in unedited[1::3])  # precondition
    out = rome_lm.loglikelihood(requests)
    assert parameter_hashes(rome_lm.backend.model) == before
    assert all(first_token_edited(out[i]) for i in (1, 4))  # post questions see the edit
    assert out[0] == unedited[0].as_response() and out[3] == unedited[3].as_response()  # pre questions do not
    assert rome_lm.backend.readout([requests[1].args])[0] == unedited[1]  # and nothing is left behind


def test_order_kept_with_plain_requests_and_repeats(rome_lm):
    doc = capital_city_case()
    edit_requests = loglikelihood_requests(doc, 0)
    plain = Instance("loglikelihood", {"text": "x"}, ("Hello", " world"), 0, ("plain", 0, 1))
    requests = [plain, edit_requests[1], edit_requests[0], edit_requests[1], plain, edit_requests[2]]
    out = rome_lm.loglikelihood(requests)
    assert len(out) == len(requests)
    assert out[0] == out[4] and len(out[0]) == 2  # plain requests answered by HFLM, unedited
    assert out[1] == out[3]  # the same Instance repeated (lm-eval repeats/padding) gets the same answer
    assert first_token_edited(out[1])


def test_readout_agrees_with_lm_eval_loglikelihood(rome_lm):
    pairs = [("The capital of France is", " Paris"), ("北京是", "中国的首都")]
    ours = rome_lm.backend.readout(pairs)
    theirs = HFLM.loglikelihood(rome_lm.backend.lm, [Instance("loglikelihood", {}, p, 0) for p in pairs])
    for readout, (ll, greedy) in zip(ours, theirs, strict=True):
        assert readout.loglikelihood == pytest.approx(ll, abs=1e-4)
        assert readout.is_greedy == greedy
        assert len(readout.answer.encode()) > 0


class MarkerEditor(Editor):
    """Writes nothing: tags every prompt with its subject, so a recorded prompt shows which edits were active."""

    name = "marker"
    hparams_class = HyperParams
    supports_batch = True

    def __init__(self) -> None:
        self.restored: list[str] = []

    def apply(self, model, tokenizer, requests, hparams) -> AppliedEdit:
        tag = "+".join(r.subject for r in requests)
        return AppliedEdit(restore=lambda: self.restored.append(tag), prompt_transform=lambda p: f"[{tag}] {p}")


def sequential_case(subject: str) -> dict:
    doc = capital_city_case(subject)
    case = EditCase.from_doc(doc["xke"])
    questions = with_final_phase(case.questions)
    return {"xke": EditCase(case.case_id, case.requests, questions, {"final_phase": True}).to_doc()}


def test_sequential_mode_answers_after_each_edit_then_after_the_last(tiny_llama_dir, monkeypatch):
    register_editor("marker", MarkerEditor)
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="marker", edit_mode="sequential")
    asked: list[str] = []
    readout = lm.backend.readout
    monkeypatch.setattr(lm.backend, "readout", lambda pairs: asked.extend(p for p, _ in pairs) or readout(pairs))
    requests = loglikelihood_requests(sequential_case("Ruritania"), 0) + loglikelihood_requests(
        sequential_case("Freedonia"), 1
    )
    out = lm.loglikelihood(requests)
    assert all(o is not None for o in out)
    post = [p for p in asked if "The capital" in p]
    assert post == [
        "[Ruritania] The capital city of Ruritania",  # case 1 right after its own edit, before case 2's
        "[Freedonia] [Ruritania] The capital city of Freedonia",
        "[Freedonia] [Ruritania] The capital city of Ruritania",  # both again after the last edit
        "[Freedonia] [Ruritania] The capital city of Freedonia",
    ]
    assert asked[:1] == ["Water is made of"]  # pre questions on the clean model, first
    assert lm.editor.restored == ["Freedonia", "Ruritania"]  # newest edit restored first
    assert "_final" in lm.get_model_info()["xke"]["edit_mode_semantics"]


def test_interleaved_sequential_edits_take_the_tasks_in_turn(tiny_llama_dir):
    register_editor("marker", MarkerEditor)
    lm = XKELM(
        pretrained=str(tiny_llama_dir), device="cpu", editor="marker", edit_mode="sequential", edit_order="interleave"
    )
    english = [("en", "Ruritania", 0), ("en", "Freedonia", 1), ("en", "Elbonia", 2)]
    chinese = [("zh", "Latveria", 0), ("zh", "Genovia", 1)]
    requests = [
        r for task, subject, i in english + chinese for r in loglikelihood_requests(sequential_case(subject), i, task)
    ]
    lm.loglikelihood(requests)
    assert lm.editor.restored[::-1] == ["Ruritania", "Latveria", "Freedonia", "Genovia", "Elbonia"]
    assert lm.get_model_info()["xke"]["edit_order"] == "interleave"
    with pytest.raises(EditorError, match="edit_order=interleave orders the edits of edit_mode=sequential"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="marker", edit_order="interleave")
    with pytest.raises(EditorError, match="edit_order must be one of dataset, interleave, got 'random'"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="marker", edit_order="random")


def test_sequential_mode_needs_tasks_built_for_it(tiny_llama_dir):
    register_editor("marker", MarkerEditor)
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="marker", edit_mode="sequential")
    built_for_single = capital_city_case()
    built_for_single["xke"]["source"] = {"final_phase": False}
    with pytest.raises(EditorError, match="built for edit_mode=single/batch but the model runs edit_mode=sequential"):
        lm.loglikelihood(loglikelihood_requests(built_for_single, 0))
    single = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="marker")
    with pytest.raises(EditorError, match="built for edit_mode=sequential but the model runs edit_mode=single"):
        single.loglikelihood(loglikelihood_requests(sequential_case("Ruritania"), 0))


def test_sequential_rome_keeps_edits_until_the_end_then_restores(tiny_llama_dir):
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="rome", edit_mode="sequential", **TINY_ROME)
    before = parameter_hashes(lm.backend.model)
    requests = loglikelihood_requests(sequential_case("Ruritania"), 0) + loglikelihood_requests(
        sequential_case("Freedonia"), 1
    )
    out = lm.loglikelihood(requests)
    assert parameter_hashes(lm.backend.model) == before
    assert all(first_token_edited(out[i]) for i in (1, 3, 6, 8))  # post answers and final re-answers
    assert lm.get_model_info()["xke"]["n_edit_cases"] == 2


def test_use_cache_is_refused(rome_lm):
    class Hook:
        dbdict = {}

    with pytest.raises(ValueError, match="--use_cache"):
        rome_lm.set_cache_hook(Hook())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"editor": "romee"}, "unknown editor 'romee'; available editors: .*rome"),
        ({"editor": "rome", "layr": 1}, "unknown model_args for --model xke: layr.*layer"),
        ({"editor": "rome", "layer": "five"}, "hyper-parameter 'layer' of editor 'rome' must be int"),
        ({"editor": "rome", "edit_mode": "batch"}, "cannot edit in batch mode"),
        ({"editor": "none", "edit_mode": "parallel"}, "edit_mode must be one of single, batch, sequential"),
        ({"editor": "none", "xke_edit_lang": "en"}, "fixed by each task"),
    ],
)
def test_bad_model_args_say_what_is_valid(tiny_llama_dir, kwargs, message):
    with pytest.raises(EditorError, match=message):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", **kwargs)


def test_editor_config_yaml_and_errors(tiny_llama_dir, tmp_path):
    good = tmp_path / "rome.yaml"
    good.write_text("layer: 2\nv_num_grad_steps: 3\n")
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="rome", editor_config=str(good), v_lr=0.1)
    assert (lm.hparams.layer, lm.hparams.v_num_grad_steps, lm.hparams.v_lr) == (2, 3, 0.1)
    broken = tmp_path / "broken.yaml"
    broken.write_text("layer: [1\n")
    with pytest.raises(EditorError, match="not valid YAML"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="rome", editor_config=str(broken))


def test_ordinary_tasks_pass_through_unedited(tiny_llama_dir, tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"q": f"Question {i}?", "a": "yes"}) + "\n" for i in range(3)))
    (tmp_path / "plain_task.yaml").write_text(
        "task: xke_plain_probe\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    kwargs = {"tasks": ["xke_plain_probe"], "task_manager": tm, "limit": 3}
    hf = simple_evaluate(model="hf", model_args=f"pretrained={tiny_llama_dir},device=cpu", **kwargs)
    xke = simple_evaluate(
        model="xke", model_args=f"pretrained={tiny_llama_dir},device=cpu,editor=rome,layer=1", **kwargs
    )
    assert xke["results"]["xke_plain_probe"]["acc,none"] == hf["results"]["xke_plain_probe"]["acc,none"]
    assert xke["config"]["xke"]["n_edit_cases"] == 0


def test_same_run_twice_gives_identical_answers_and_metrics(tiny_llama_dir, data_dir, monkeypatch, xke_tasks):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    args = ",".join(f"{k}={v}" for k, v in TINY_ROME.items())

    def run() -> tuple[list, dict]:
        out = simple_evaluate(
            task_manager=xke_tasks,
            model="xke",
            model_args=f"pretrained={tiny_llama_dir},device=cpu,editor=rome,{args}",
            tasks=["bizsre_zh"],
            limit=2,
            log_samples=True,
        )
        return [s["filtered_resps"] for s in out["samples"]["bizsre_zh"]], out["results"]["bizsre_zh"]

    assert run() == run()


def test_task_options_that_never_reached_the_task_are_an_error(tiny_llama_dir, data_dir, monkeypatch, xke_tasks):
    # a user-made TaskManager does not receive model_args: xke_f1 would be silently ignored
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    with pytest.raises(EditorError, match="built without the model_args {'xke_f1': 'legacy_pr'}"):
        simple_evaluate(
            model="xke",
            model_args=f"pretrained={tiny_llama_dir},device=cpu,editor=none,xke_f1=legacy_pr",
            tasks=["bizsre_en"],
            limit=1,
            task_manager=xke_tasks,
        )
