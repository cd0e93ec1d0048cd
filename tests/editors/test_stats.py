"""The key-statistics engine: one pass for many layers, corpus mixtures, the disk cache, resume and corruption."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from lm_eval_xke import stats

WORDS = "the of and river city king war music science school language north village island".split()
LAYERS = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1, 2)]


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(" ".join(WORDS[(i * j) % len(WORDS)] for j in range(9)) for i in range(40)))
    b.write_text("\n".join("北京 上海 河流 城市 音乐"[i % 7 :] + " 学校" * (i % 5) for i in range(40)))
    return a, b


def naive_second_moment(model, tokenizer, module: str, texts: list[str], n_tokens: int) -> torch.Tensor:
    """The definition, one document at a time with a full forward pass: mean of k k^T over the first n_tokens."""
    keys = []
    handle = model.get_submodule(module).register_forward_hook(lambda _m, args, _o: keys.append(args[0][0]))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    handle.remove()
    k = torch.cat(keys)[:n_tokens].double()
    return (k.T @ k / k.shape[0]).float()


def count_tallies(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = stats.tally
    monkeypatch.setattr(stats, "tally", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_one_pass_for_several_layers_equals_the_definition(tiny, corpora):
    model, tokenizer = tiny
    a, _ = corpora
    got = stats.key_statistics(model, tokenizer, LAYERS, str(a), n_tokens=700, batch_size=4)
    texts = stats.load_texts(a)
    for name in LAYERS:
        assert torch.allclose(got[name], naive_second_moment(model, tokenizer, name, texts, 700), atol=1e-6, rtol=1e-4)


def test_the_forward_pass_stops_after_the_deepest_requested_layer(tiny, corpora):
    model, tokenizer = tiny
    later = []
    handle = model.model.layers[3].register_forward_hook(lambda *_: later.append(1))
    try:
        stats.key_statistics(model, tokenizer, LAYERS[:2], str(corpora[0]), n_tokens=200)
    finally:
        handle.remove()
    assert later == []


def test_a_mixture_is_the_weighted_mean_of_its_sources(tiny, corpora):
    model, tokenizer = tiny
    a, b = corpora
    mixed = stats.key_statistics(model, tokenizer, LAYERS[:1], f"{a}:1+{b}:3", n_tokens=800)[LAYERS[0]]
    only_a = stats.key_statistics(model, tokenizer, LAYERS[:1], str(a), n_tokens=200)[LAYERS[0]]
    only_b = stats.key_statistics(model, tokenizer, LAYERS[:1], str(b), n_tokens=600)[LAYERS[0]]
    assert torch.allclose(mixed, 0.25 * only_a + 0.75 * only_b)


def test_cached_results_are_reused_and_bad_files_rebuilt(tiny, corpora, monkeypatch, caplog):
    model, tokenizer = tiny
    a, _ = corpora
    calls = count_tallies(monkeypatch)
    first = stats.key_statistics(model, tokenizer, LAYERS, str(a), n_tokens=300)
    files = sorted((stats.stats_dir()).rglob("*.pt"))
    assert len(files) == 3 and len(calls) == 1
    assert torch.equal(
        stats.key_statistics(model, tokenizer, LAYERS, str(a), n_tokens=300)[LAYERS[1]], first[LAYERS[1]]
    )
    assert len(calls) == 1  # all three from disk

    payload = torch.load(files[0], weights_only=True)
    tampered = {**payload, "mom2": payload["mom2"] * 1.01}  # checksum no longer matches
    other_key = {**payload, "key": {**payload["key"], "n_tokens": 999}}  # a file of other settings
    for broken in (b"not a tensor", tampered, other_key):
        if isinstance(broken, bytes):
            files[0].write_bytes(broken)
        else:
            torch.save(broken, files[0])
        with caplog.at_level(logging.WARNING, logger="lm_eval.models.xke.stats"):
            again = stats.key_statistics(model, tokenizer, LAYERS, str(a), n_tokens=300)
        assert "rebuilding it" in caplog.text
        caplog.clear()
        assert all(torch.equal(again[n], first[n]) for n in LAYERS)
    assert len(calls) == 4  # one tally per broken file, of the one missing module only


def test_an_interrupted_tally_resumes_and_gives_the_same_result(tiny, corpora, monkeypatch, tmp_path):
    model, tokenizer = tiny
    a, _ = corpora
    uninterrupted = stats.key_statistics(model, tokenizer, LAYERS, str(a), 500, batch_size=2, cache_dir=tmp_path / "x")
    batches = []
    real_forward = model.forward

    def dying_forward(*args, **kwargs):
        batches.append(1)
        if len(batches) == 6:
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        stats.key_statistics(model, tokenizer, LAYERS, str(a), 500, batch_size=2, checkpoint_seconds=0)
    assert len(list(stats.stats_dir().rglob("*.partial.pt"))) == 1
    batches.clear()
    resumed = stats.key_statistics(model, tokenizer, LAYERS, str(a), 500, batch_size=2, checkpoint_seconds=0)
    assert 0 < len(batches) < 10  # started after the five finished batches
    assert not list(stats.stats_dir().rglob("*.partial.pt"))
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in LAYERS)


def test_the_cache_key_tells_checkpoints_apart(tiny, corpora):
    model, _ = tiny
    source = stats.parse_corpus(str(corpora[0]))[0]
    key = stats.cache_key(model, LAYERS[0], source, 100, "float32", 512)
    perturbed = AutoModelForCausalLM.from_pretrained(model.config.name_or_path, dtype=torch.float32)
    with torch.no_grad():
        perturbed.model.embed_tokens.weight.mul_(1.001)
    assert stats.cache_key(perturbed, LAYERS[0], source, 100, "float32", 512)["weights"] != key["weights"]
    assert stats.cache_key(model, LAYERS[0], source, 100, "float64", 512) != key


def test_corpus_specs_and_readers(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("XKE_DATA_DIR", str(data_dir))
    en, zh = stats.parse_corpus("en:3+zh")
    assert (en.name, en.weight, zh.name, zh.weight) == ("en", 0.75, "zh", 0.25)
    assert len(en.texts) > 9000 and all("/" not in t[:20] for t in zh.texts[:50])  # POS tags stripped
    assert zh.texts[0].startswith("迈向充满希望")
    assert len(stats.read_source("bizsre_zh")) == 3 * 1037
    (tmp_path / "b.json").write_text('{"X": {"title": "X", "extract": "x text"}, "Y": {"extract": "y"}}')
    (tmp_path / "c.jsonl").write_text('{"text": "first"}\n"second"\n')
    assert stats.load_texts(tmp_path / "b.json") == ["x text", "y"]
    assert stats.load_texts(tmp_path / "c.jsonl") == ["first", "second"]
    for spec, message in [
        ("", "empty corpus spec"),
        ("klingon", "unknown corpus source 'klingon'"),
        ("en:-1", "must be positive"),
    ]:
        with pytest.raises(stats.CorpusError, match=message):
            stats.parse_corpus(spec)
    (tmp_path / "bad.json").write_text("{truncated")
    with pytest.raises(stats.CorpusError, match="cannot read corpus file .*bad.json"):
        stats.load_texts(tmp_path / "bad.json")


def test_the_stats_command_computes_and_reports(tiny_llama_dir, corpora, capsys):
    from lm_eval_xke.cli import main

    args = ["stats", "--pretrained", str(tiny_llama_dir), "--layers", "0,1", "--corpus", str(corpora[0])]
    assert main([*args, "--n-tokens", "300"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj: 128x128, trace" in out and "model.layers.1.mlp.down_proj" in out
    assert len(list(stats.stats_dir().rglob("*.pt"))) == 2
