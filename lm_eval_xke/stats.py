"""MLP key statistics: the uncentred second moment ``C = E[k k^T]`` of a module's inputs, cached on disk.

ROME's covariance adjustment (and MEMIT's least-squares update) needs C over a text corpus, where ``k`` is the
input of the edited module. Estimating it is the slow part of those methods, so the result is cached under
``$XKE_CACHE_DIR/stats`` (default ``~/.cache/lm_eval_xke/stats``), keyed by everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the tally hook: nothing after the hooked module is needed, so the forward pass ends there."""


def stats_dir() -> Path:
    root = os.environ.get("XKE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lm_eval_xke") / "stats"


def load_texts(path: str | Path) -> list[str]:
    """Documents of a corpus: ``.txt`` one per line; ``.json`` a list of strings or ``{title: {"extract": ...}}``."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data.values() if isinstance(data, dict) else data
        texts = [item["extract"] if isinstance(item, dict) else item for item in items]
    else:
        texts = path.read_text(encoding="utf-8").splitlines()
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"corpus {path} holds no text")
    return texts


def module_input_width(module: torch.nn.Module) -> int:
    """Width of the module's input; GPT-2's ``Conv1D`` stores its weight ``[in, out]``, ``nn.Linear`` ``[out, in]``."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0])
    raise TypeError(f"unsupported module type {type(module).__name__}: expected nn.Linear or Conv1D")


def weight_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of the module's weight bytes, so that two checkpoints saved under one path never share a cache."""
    weight = module.weight.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha256(weight.view(torch.uint8).numpy().tobytes()).hexdigest()


def texts_sha256(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def stats_key(model, module_name: str, texts: Sequence[str], n_tokens: int, max_length: int) -> str:
    parts = {
        "model": str(getattr(model.config, "name_or_path", "")),
        "weight": weight_fingerprint(model.get_submodule(module_name)),
        "module": module_name,
        "corpus": texts_sha256(texts),
        "n_tokens": n_tokens,
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def second_moment(
    model,
    tokenizer,
    module_name: str,
    texts: Sequence[str],
    n_tokens: int,
    batch_size: int = 8,
    max_length: int = 512,
    cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """``E[x x^T]`` (float32, on CPU) of ``module_name``'s inputs over the first ``n_tokens`` tokens of ``texts``.

    Documents are truncated to ``max_length`` tokens. A cached result is used only if it loads and has the
    right shape; anything else is rebuilt and overwritten.
    """
    width = module_input_width(model.get_submodule(module_name))
    path = Path(cache_dir or stats_dir()) / f"{stats_key(model, module_name, texts, n_tokens, max_length)}.pt"
    cached = _load(path, width)
    if cached is not None:
        return cached
    mom2, count = tally_second_moment(model, tokenizer, module_name, texts, n_tokens, batch_size, max_length)
    _save(path, {"mom2": mom2, "count": count, "module": module_name, "n_tokens": n_tokens})
    return mom2


def tally_second_moment(
    model, tokenizer, module_name: str, texts: Sequence[str], n_tokens: int, batch_size: int, max_length: int
) -> tuple[torch.Tensor, int]:
    """Accumulate ``sum x x^T`` over real (unpadded) tokens until ``n_tokens`` are seen; return the mean and count."""
    module = model.get_submodule(module_name)
    width = module_input_width(module)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total: torch.Tensor | None = None  # lives on the module's device, so big layers are not copied per batch
    count = 0
    captured: list[torch.Tensor] = []

    def hook(_module, args, _output):
        captured.append(args[0])
        raise _StopForward

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            if count >= n_tokens:
                break
            encoded = [
                tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
                for t in texts[start : start + batch_size]
            ]
            input_ids, mask = pad_right(encoded, pad_id, device)
            captured.clear()
            with torch.no_grad():
                try:
                    model(input_ids=input_ids, attention_mask=mask)
                except _StopForward:
                    pass
            keys = captured[0][mask.to(captured[0].device).bool()].float()[: n_tokens - count]
            total = keys.T @ keys if total is None else total + keys.T @ keys
            count += keys.shape[0]
    finally:
        handle.remove()
        model.train(was_training)
    if count < n_tokens:
        log.warning("corpus gave %d tokens, fewer than the %d requested for %s", count, n_tokens, module_name)
    if count < width:
        log.warning("second moment of %s from %d tokens for width %d is rank-deficient", module_name, count, width)
    if total is None:
        total = torch.zeros(width, width)
    return (total / max(count, 1)).cpu(), count


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a right-padded batch and its attention mask (positions stay 0..n-1 for every row)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _load(path: Path, width: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        mom2 = torch.load(path, map_location="cpu", weights_only=True)["mom2"]
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
        # an unreadable file is a cache miss, never a crash
        log.warning("ignoring unreadable statistics cache %s (%s); rebuilding it", path, err)
        return None
    if not isinstance(mom2, torch.Tensor) or tuple(mom2.shape) != (width, width) or not torch.isfinite(mom2).all():
        log.warning("ignoring statistics cache %s with unexpected content; rebuilding it", path)
        return None
    return mom2.float()


def _save(path: Path, payload: dict) -> None:
    # write to a temp file in the same folder, then rename: readers never see a half-written file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
