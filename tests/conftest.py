"""Shared fixtures: tiny random models saved once per session, and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lm_eval_xke.testing import load_tiny, save_tiny_model


@pytest.fixture(scope="session", autouse=True)
def _journals_per_session(tmp_path_factory):
    """Session- and module-scoped runs journal into this session's folder, never into ``~/.cache``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XKE_JOURNAL_DIR", str(tmp_path_factory.mktemp("journals")))
        yield


@pytest.fixture(autouse=True)
def _journals_per_test(tmp_path, monkeypatch):
    """Each test journals into its own folder: a journal from an earlier test or session is never reused."""
    monkeypatch.setenv("XKE_JOURNAL_DIR", str(tmp_path / "journals"))


REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path | None:
    """``XKE_DATA_DIR``, else ``../shared/data`` beside the repository (CI layout), else None."""
    candidates = [os.environ.get("XKE_DATA_DIR"), REPO.parent / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "bizsre" / "bizsre_test.json").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("real benchmark data not found: set XKE_DATA_DIR or place ../shared/data beside the repo")
    return found


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    """The tiny Llama and its tokenizer, loaded once per test module (a module may change and restore its weights)."""
    return load_tiny(tiny_llama_dir)


#: words of the small corpus the key-statistics tests estimate second moments on
CORPUS_WORDS = "the of and river city king war music science school language north village island".split()


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small English text file for MLP key statistics, with the statistics cache in the test's own folder."""
    monkeypatch.setenv("XKE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    words = CORPUS_WORDS
    path.write_text("\n".join(" ".join(words[(i * j) % len(words)] for j in range(10)) for i in range(80)))
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models gain nothing from threads, and on a busy 2-core machine spinning threads slow
    them down a lot. Tiny-model test modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def arch_dir(request):
    """``(model_type, folder)`` of each tiny architecture in turn."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from its PyPI package (cached across runs under ~/.cache/lm_eval_xke)."""
    from lm_eval_xke import offline_models

    try:
        return offline_models.prepare("smollm2-135m-instruct")
    except offline_models.OfflineModelError as err:
        pytest.skip(f"SmolLM2 not available offline: {err}")


@pytest.fixture(scope="session")
def xke_tasks():
    """A TaskManager over our task folders only: skips indexing lm-eval's ~14k built-in task files (~5-20 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)
