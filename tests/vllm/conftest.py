"""The vLLM tests: run by their own CI step (scripts/test_vllm.sh) in a venv with vLLM, not collected without it.

One vLLM engine per configuration serves the whole session: ``xke`` caches the `xke` models it builds, and their
`vllm` backends are shared by every model with the same folder and backend arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lm_eval_xke.backends.vllm_engine import vllm_distribution

try:
    vllm_distribution()
except ImportError:
    collect_ignore_glob = ["test_*.py"]

# the engine in the test process: ~10 s to start on 2 busy cores, instead of ~60 s for two more processes that
# each import vLLM (the multiprocess default is what the benchmark runs)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

#: engine arguments of every test engine: tiny models need little context and KV cache
ENGINE = {"max_model_len": 256, "kv_cache_memory_bytes": 64 << 20}


@pytest.fixture(scope="session")
def xke() -> Iterator[Callable]:
    """``xke(model_dir, editor="rome_replayed", backend="vllm", **model_args)``: a float32 CPU `xke` model."""
    from vllm_cases import ReplayedRome

    from lm_eval_xke import model as xke_model
    from lm_eval_xke import model_args as xke_args
    from lm_eval_xke.editors import register_editor

    register_editor(ReplayedRome.name, ReplayedRome)
    backend_class = xke_args.backend_class
    models: dict[tuple, object] = {}
    backends: dict[tuple, object] = {}

    def shared_backend_class(name: str):
        cls = backend_class(name)
        if name != "vllm":
            return cls

        def shared(**kwargs):
            key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
            if key not in backends:
                backends[key] = cls(**kwargs)
            return backends[key]

        shared.engine_argument_names = cls.engine_argument_names
        shared.name = cls.name
        return shared

    def make(model_dir: Path, editor: str = ReplayedRome.name, backend: str = "vllm", **model_args):
        key = (str(model_dir), editor, backend, tuple(sorted((k, str(v)) for k, v in model_args.items())))
        if key not in models:
            engine = ENGINE if backend == "vllm" else {}
            models[key] = xke_model.XKELM(
                pretrained=str(model_dir),
                device="cpu",
                dtype="float32",
                editor=editor,
                backend=backend,
                **engine,
                **model_args,
            )
        return models[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(xke_args, "backend_class", shared_backend_class)
        yield make
