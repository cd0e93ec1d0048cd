"""Every editor runs with its defaults on any model of a family (layer defaults placed at the model's relative depth),
and presets that reproduce another implementation's procedure (``preset=easyedit``)."""

from __future__ import annotations

import pytest

from lm_eval_xke.editing import templates
from lm_eval_xke.editors import AtDepth, EditorError, available_editors, get_editor
from lm_eval_xke.model import XKELM
from lm_eval_xke.testing import MODEL_SHAPES, load_tiny, save_tiny_model
from lm_eval_xke.training import is_trainable

pytestmark = pytest.mark.usefixtures("one_thread")


def test_at_depth_places_layers_at_the_same_relative_depth():
    assert [AtDepth(5, of=32).resolve(n) for n in (32, 30, 16, 10, 4, 1)] == [5, 5, 2, 2, 1, 0]
    assert AtDepth(27, of=32).resolve(4) == 3 and AtDepth(27, of=32).resolve(100) == 84
    # a range maps its ends and keeps every layer between them; it never leaves the model
    assert AtDepth((4, 5, 6, 7, 8), of=32).resolve(10) == [1, 2]
    assert AtDepth((4, 5, 6, 7, 8), of=24).resolve(28) == [5, 6, 7, 8, 9]
    assert AtDepth((30, 31), of=32).resolve(4) == [3]
    assert AtDepth((1, 5), of=10).resolve(20) == [2, 10]  # not a range: each layer on its own
    assert AtDepth((4, 5), of=32).resolve(None) == [4, 5]  # no depth known: the reference model's own


#: (model_type, depth) of the models the READMEs measure, and LLaMA-7B (EasyEdit's reference configurations)
SMOLLM2, QWEN, GEMMA, GPT2, LLAMA7B = ("llama", 30), ("qwen2", 24), ("gemma3_text", 18), ("gpt2", 12), ("llama", 32)
FOUR_TO_EIGHT = [4, 5, 6, 7, 8]
#: editor -> field -> the layers on each model above; the small models' are the values their numbers were measured at
RESOLVED = {
    "rome": ("layer", {SMOLLM2: 5, QWEN: 5, GEMMA: 5, GPT2: 5, LLAMA7B: 5}),
    "memit": ("layers", {SMOLLM2: FOUR_TO_EIGHT, QWEN: FOUR_TO_EIGHT, GEMMA: FOUR_TO_EIGHT, GPT2: [3, 4, 5]}),
    "alphaedit": ("layers", {SMOLLM2: FOUR_TO_EIGHT, QWEN: FOUR_TO_EIGHT, GEMMA: FOUR_TO_EIGHT, GPT2: [3, 4, 5]}),
    "langedit": ("layers", {SMOLLM2: FOUR_TO_EIGHT, QWEN: FOUR_TO_EIGHT, GEMMA: FOUR_TO_EIGHT, LLAMA7B: FOUR_TO_EIGHT}),
    "grace": ("layer", {SMOLLM2: 25, QWEN: 20, GEMMA: 15, GPT2: 10, LLAMA7B: 27}),
    "wise": ("layer", {SMOLLM2: 25, QWEN: 20, GEMMA: 15, GPT2: 10, LLAMA7B: 27, ("qwen2", 28): 23}),
    "ft_l": ("layers", {SMOLLM2: [20], QWEN: [16], GEMMA: [12], GPT2: [8], LLAMA7B: [21]}),
}


@pytest.mark.parametrize("editor", sorted(RESOLVED))
def test_layer_defaults_of_the_measured_models_are_unchanged(editor):
    field, expected = RESOLVED[editor]
    resolved = {
        (model_type, depth): getattr(get_editor(editor)().resolve_hparams(model_type, num_layers=depth), field)
        for model_type, depth in expected
    }
    assert resolved == expected


def test_memits_lambda_is_the_measured_one_on_the_small_families_only():
    memit, alphaedit = get_editor("memit")(), get_editor("alphaedit")()
    assert [memit.resolve_hparams(t).lambda_per_width for t in ("llama", "qwen2")] == [0.6, 0.6]
    assert memit.resolve_hparams("gemma3_text").lambda_per_width == pytest.approx(15000 / 11008)
    assert memit.resolve_hparams("llama", overrides={"lambda_per_width": "1.36"}).update_weight(1536) == 1.36 * 1536
    assert alphaedit.resolve_hparams("llama").lambda_per_width == pytest.approx(15000 / 11008)  # AlphaEdit has no λ


def test_given_layers_are_taken_as_they_are():
    rome = get_editor("rome")()
    assert rome.resolve_hparams("qwen2", overrides={"layer": "7"}, num_layers=10).layer == 7
    assert get_editor("memit")().resolve_hparams("gpt2", overrides={"layers": "0|3"}, num_layers=4).layers == [0, 3]


@pytest.fixture(scope="session")
def shape_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return {name: save_tiny_model(root / name, arch, num_layers=n) for name, (arch, n) in MODEL_SHAPES.items()}


def cases():
    """Every editor on the 4-block Llama in the default run; the other shapes are `slow` (the whole table:
    ``benchmarks/editor_defaults.py`` through the CLI in subprocesses)."""
    for editor in available_editors():
        for shape in MODEL_SHAPES:
            marks = () if shape == "llama4" else (pytest.mark.slow,)
            yield pytest.param(editor, shape, marks=marks, id=f"{editor}-{shape}")


@pytest.mark.parametrize(("editor", "shape"), list(cases()))
def test_every_editor_runs_with_its_defaults(editor, shape, shape_dirs, data_dir, tmp_path, monkeypatch):
    """The CLI's own path in-process (``simple_evaluate`` with the model_args string), one Bi-ZsRE case; editors that
    need a trained checkpoint say how to make one."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path / "cache"))
    args = simple_parse_args_string(f"editor={editor},pretrained={shape_dirs[shape]},device=cpu")
    run = dict(model="xke", model_args=args, tasks=["bizsre_en"], limit=1.0)
    if is_trainable(get_editor(editor)):
        with pytest.raises(EditorError, match="needs a trained .*editor_checkpoint=DIR.*lm-eval-xke train"):
            simple_evaluate(**run, task_manager=TaskManager(include_defaults=False, metadata=args))
        return
    results = simple_evaluate(**run, task_manager=TaskManager(include_defaults=False, metadata=args))
    assert set(results["results"]["bizsre_en"]) >= {"reliability_en_em,none", "locality_en_em,none"}
    depth = MODEL_SHAPES[shape][1]
    hparams = results["config"]["xke"]["hparams"]
    layers = [hparams["layer"]] if "layer" in hparams else hparams.get("layers") or []
    assert all(0 <= layer < depth for layer in layers), hparams


# ---------------------------------------------------------------- presets


def test_the_easyedit_preset_sits_between_the_family_defaults_and_the_users_values():
    rome = get_editor("rome")()
    hp = rome.resolve_hparams("llama", overrides={"template_seed": "7"}, num_layers=30, preset="easyedit")
    assert (hp.v_num_grad_steps, hp.early_stop_on, hp.early_stop_plain) == (24, "loss", False)
    assert (hp.context_template_length, hp.context_template_normalise, hp.template_seed) == ("total", True, 7)
    assert hp.layer == 5  # the preset changes the procedure, not where the family edits
    memit = get_editor("memit")().resolve_hparams("qwen2", num_layers=24, preset="easyedit")
    assert memit.mom2_update_weight == 15000.0 and memit.update_weight(4864) == 15000.0
    ft = get_editor("ft_m")().resolve_hparams("llama", num_layers=30, preset="easyedit")
    assert (ft.lr, ft.norm_constraint, ft.layers) == (5e-4, None, [20])
    with pytest.raises(EditorError, match="editor 'alphaedit' has no preset 'easyedit'.*Editors with presets: .*memit"):
        get_editor("alphaedit")().resolve_hparams("llama", preset="easyedit")


def test_easyedit_context_prefixes_count_every_token_and_are_normalised(tiny_llama_dir, monkeypatch):
    """EasyEdit's ``generate_fast`` stops at ``length`` tokens in all (start word and BOS included) and applies NFKD
    with blank lines made spaces; ours samples ``length`` new tokens and keeps the text as written."""
    model, tokenizer = load_tiny(tiny_llama_dir)
    asked = []

    def sample(_model, _tokenizer, start, count, length, _generator):
        asked.append((start, length))
        return [f"{start} ﬁ\n\nx"] * count

    monkeypatch.setattr(templates, "sample_continuations", sample)
    ours = templates.generate_context_templates(model, tokenizer, [5], 5, 0)
    assert asked == [(word, 5) for word in templates.START_WORDS] and ours[1] == "The ﬁ\n\nx. {}"
    asked.clear()
    easyedit = templates.generate_context_templates(model, tokenizer, [5], 5, 0, total_length=True, normalise=True)
    # the byte-level tokenizer: <s> plus one token per byte
    assert asked == [(word, max(0, 5 - 1 - len(word.encode()))) for word in templates.START_WORDS]
    assert asked[1] == ("Therefore", 0) and easyedit[1] == "The fi x. {}"


def test_the_preset_is_a_model_arg_recorded_in_the_results(tiny_llama_dir):
    lm = XKELM(pretrained=str(tiny_llama_dir), device="cpu", editor="rome", preset="easyedit")
    xke = lm.get_model_info()["xke"]
    assert xke["preset"] == "easyedit" and xke["hparams"]["early_stop_on"] == "loss"
    assert xke["hparams"]["layer"] == 1  # 5 of 32 on the 4-block model
    with pytest.raises(EditorError, match="editor 'none' has no preset 'easyedit'; its presets: \\(none\\)"):
        XKELM(pretrained=str(tiny_llama_dir), device="cpu", preset="easyedit")
