"""Training of MEND/SERAC on tiny random models: data, the loop's loss, checkpoints, resume and the artefact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm_eval_xke import training
from lm_eval_xke.cli import main
from lm_eval_xke.editors import EditorError, build_hparams
from lm_eval_xke.plugins.mend import MendEditor
from lm_eval_xke.testing import load_tiny, save_tiny_model
from lm_eval_xke.training import (
    DataSource,
    batch_at,
    data_sources,
    load_artefact,
    load_records,
    load_trainable,
    read_records,
    split_validation,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_tab_file(path: Path, n: int = 24, word: str = "thing") -> Path:
    path.write_text("".join(f"Where is {word} {i}?\tplace {i % 5}\n" for i in range(n)), encoding="utf-8")
    return path


@pytest.fixture
def tab_file(tmp_path) -> Path:
    return write_tab_file(tmp_path / "facts_en.txt")


def train_args(model_dir, out, data, editor: str = "mend", **options) -> list[str]:
    settings = {"steps": 6, "val_every": 3, "val_size": 4, "checkpoint_every": 2, "lr": 1e-3, **options}
    args = ["train", editor, "--pretrained", str(model_dir), "--out", str(out), "--data", f"en={data}"]
    return args + [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


# ---------------------------------------------------------------- data


def test_tab_files_get_their_question_as_rephrase_and_another_fact_as_locality(tab_file):
    records = read_records(DataSource(tab_file, "en"))
    assert len(records) == 24
    first = records[0]
    assert (first.src, first.rephrase, first.alt) == ("Where is thing 0?", "Where is thing 0?", "place 0")
    assert (first.loc, first.loc_ans) == ("Where is thing 12?", "place 2")  # record (i + n // 2) % n


def test_zsre_json_records_and_the_real_training_files(data_dir):
    sources = data_sources("en+zh", [f"en={data_dir}/train/zsre_mend_train_en_10000.json"])
    assert [s.lang for s in sources] == ["en"]
    en = read_records(sources[0])
    assert len(en) == 10_000 and en[0].loc.startswith("nq question: ") and en[0].rephrase != en[0].src
    chinese = read_records(DataSource(data_dir / "bizsre" / "zsre_mend_eval_chinese.json", "zh"))
    assert len(chinese) == 3000 and chinese[0].lang == "zh"


def test_default_mixture_pairs_the_parallel_files_as_translations(data_dir, monkeypatch):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    sources = data_sources("en+zh")
    assert [(s.path.name, s.lang) for s in sources] == [
        ("zsre_mend_train_en_10000.json", "en"),
        ("zsre_mend_train_zh_10000.txt", "zh"),
    ]
    records = load_records(sources)
    assert len(records) == 20_000
    assert records[0].translations == (records[10_000].src,) and records[10_000].translations == (records[0].src,)
    assert "Christiane Cohendy" in records[10_000].src  # the zh file is the line-by-line translation


def test_data_problems_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("XKE_DATA_DIR", str(tmp_path))
    with pytest.raises(EditorError, match="not found under XKE_DATA_DIR.*--data LANG=PATH"):
        data_sources("zh")
    with pytest.raises(EditorError, match="langs must be one of en, zh, en\\+zh"):
        data_sources("fr")
    with pytest.raises(EditorError, match="cannot tell the language.*en=PATH or zh=PATH"):
        data_sources("en", [str(write_tab_file(tmp_path / "facts.txt"))])
    bad = tmp_path / "bad_en.txt"
    bad.write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(EditorError, match="question<TAB>answer"):
        read_records(DataSource(bad, "en"))


def test_batches_depend_on_the_seed_and_step_only(tab_file):
    records = read_records(DataSource(tab_file, "en"))
    train, val = split_validation(records, 4, seed=3)
    assert len(train) == 20 and not set(train) & set(val)
    assert batch_at(train, 7, 3, seed=1) == batch_at(list(train), 7, 3, seed=1)
    epoch = [r for step in range(5) for r in batch_at(train, step, 4, seed=1)]
    assert sorted(r.index for r in epoch) == sorted(r.index for r in train)  # one epoch visits every record once
    assert batch_at(train, 0, 4, seed=1) != batch_at(train, 0, 4, seed=2)


# ---------------------------------------------------------------- the loop, through the CLI


def test_training_lowers_the_loss_and_writes_a_loadable_artefact(tiny_llama_dir, tab_file, tmp_path, capsys):
    out = tmp_path / "mend"
    assert main(train_args(tiny_llama_dir, out, tab_file, steps=12, batch_size=2)) == 0
    printed = capsys.readouterr()
    assert "step 12: val_edit" in printed.err + printed.out  # the validation metric as it trains
    config = json.loads((out / "config.json").read_text())
    assert config["editor"] == "mend" and config["base_model"]["model_type"] == "llama"
    assert config["training_data"]["files"][0]["sha256"] == DataSource(tab_file, "en").sha256
    assert config["hparams"]["rank"] == 1920 and config["hparams"]["steps"] == 12
    result = config["result"]
    assert result["last_loss"] < result["first_loss"] and result["peak_memory_mb"] > 0
    assert not (out / "checkpoint.pt").exists()
    model, tokenizer = load_tiny(tiny_llama_dir)
    trainable = load_trainable(MendEditor, out, model, tokenizer)
    assert not trainable.training and trainable.names == [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]


def interrupt_at_step_5(monkeypatch, args: list[str]) -> None:
    """Run the training command and interrupt it (Ctrl-C) in its fifth step."""
    original_train = training.train

    def interrupted(trainable, *rest):
        calls = {"n": 0}
        loss = trainable.loss

        def loss_until_step_5(records):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return loss(records)

        trainable.loss = loss_until_step_5
        return original_train(trainable, *rest)

    with monkeypatch.context() as patch:
        patch.setattr(training, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            main(args)


def test_resumed_training_equals_an_uninterrupted_run(tiny_llama_dir, tab_file, tmp_path, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(train_args(tiny_llama_dir, whole, tab_file)) == 0
    interrupt_at_step_5(monkeypatch, train_args(tiny_llama_dir, resumed, tab_file))
    saved = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert saved["state"]["step"] == 4  # the checkpoint of step 4; step 5 was interrupted
    assert main(train_args(tiny_llama_dir, resumed, tab_file)) == 0

    first = torch.load(whole / "editor.pt", weights_only=True)
    second = torch.load(resumed / "editor.pt", weights_only=True)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    losses = [json.loads((d / "config.json").read_text())["result"]["last_loss"] for d in (whole, resumed)]
    assert losses[0] == losses[1]


def test_a_checkpoint_of_another_run_is_not_resumed(tiny_llama_dir, tab_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_at_step_5(monkeypatch, train_args(tiny_llama_dir, out, tab_file))
    with pytest.raises(EditorError, match=r"belongs to another training run .*lr 0.001 -> 0.01.*another --out folder"):
        main(train_args(tiny_llama_dir, out, tab_file, lr=1e-2))
    assert main(train_args(tiny_llama_dir, out, tab_file, steps=8)) == 0  # more steps: resumed
    assert json.loads((out / "config.json").read_text())["result"]["steps"] == 8


def test_an_artefact_is_refused_for_another_base_model(tiny_llama_dir, tab_file, tmp_path):
    out = tmp_path / "mend"
    assert main(train_args(tiny_llama_dir, out, tab_file, steps=2)) == 0
    other, tokenizer = load_tiny(save_tiny_model(tmp_path / "other", "llama", seed=1))
    with pytest.raises(EditorError, match=r"was trained for base model .* but this model is .* train one for"):
        load_artefact(out, other, "mend")
    with pytest.raises(EditorError, match="holds a 'mend' editor, not 'serac'"):
        load_artefact(out, load_tiny(tiny_llama_dir)[0], "serac")
    with pytest.raises(EditorError, match="is not a trained mend folder"):
        load_artefact(tmp_path, other, "mend")


def test_unknown_training_option_is_named(tiny_llama_dir, tab_file, tmp_path):
    with pytest.raises(EditorError, match="'rank' of training of 'mend' must be int"):
        main(train_args(tiny_llama_dir, tmp_path / "x", tab_file, rank="many"))
    with pytest.raises(EditorError, match="unknown hyper-parameter"):
        build_hparams(MendEditor.train_hparams_class, {"nope": 1}, source="x")


def test_train_finds_editors_by_their_declared_training_step(monkeypatch):
    """A plugin that declares a training step is a `train` command without any list to edit; others are refused."""
    from lm_eval_xke import editors

    class TrainedMend(MendEditor):
        name = "trained_mend_plugin"

    monkeypatch.setitem(editors._runtime_editors, TrainedMend.name, TrainedMend)
    assert {"mend", "serac", TrainedMend.name} <= set(training.trainable_editors())
    assert "rome" not in training.trainable_editors()
    with pytest.raises(EditorError, match="'rome' has no training step; trainable editors: .*mend.*serac"):
        training.trainable_editor("rome")
    with pytest.raises(SystemExit) as shown:
        main(["train", TrainedMend.name, "--help"])
    assert shown.value.code == 0
