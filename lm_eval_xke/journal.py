"""Resumable runs: an append-only journal of the edit cases an `xke` run has finished.

The first line is a header holding the run's identity (editor, hyper-parameters, model and weights
fingerprint, backend settings, the edit cases' inputs). Every further line is one finished case: its
task and doc id, a hash of its inputs, the answers of its requests in order, and what its edit cost or
why it failed; each line carries the sha256 of its own content and is fsync'd after writing, so a run
killed at any point leaves at most its last line torn. Re-running the same command reads the journal
back: finished cases are answered from it, a torn last line is dropped (that case is recomputed), and a
journal written by another configuration is refused with the field that differs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("lm_eval.models.xke")

FORMAT_VERSION = 1
#: ``journal=`` values that switch journaling off (lm-eval turns ``false``/``none`` into ``False``/``None``)
OFF_VALUES = ("off", "false", "no", "0", "none")


class JournalError(ValueError):
    """A journal that cannot be used for this run, worded for the user (names the file and how to start fresh)."""


def digest(value: Any) -> str:
    """sha256 of ``value``'s canonical JSON (sorted keys, no spaces); non-JSON leaves are written with ``str``."""
    return hashlib.sha256(_canonical(value).encode("utf-8")).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def journals_dir() -> Path:
    """``$XKE_JOURNAL_DIR``, else ``journals`` in the cache folder (``$XKE_CACHE_DIR`` or ``~/.cache/lm_eval_xke``)."""
    if os.environ.get("XKE_JOURNAL_DIR"):
        return Path(os.environ["XKE_JOURNAL_DIR"])
    root = os.environ.get("XKE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lm_eval_xke") / "journals"


def journal_enabled(setting: Any) -> bool:
    """Whether the ``journal`` model_arg asks for a journal."""
    return not (setting is None or setting is False or str(setting).strip().lower() in OFF_VALUES)


def journal_path(setting: Any, identity: Mapping[str, Any]) -> Path:
    """Where the journal of a run with ``identity`` lives.

    ``setting`` is the ``journal`` model_arg: ``auto`` (the cache folder), a folder (an existing one or a
    path ending in ``/``; the file is named by the identity's hash), or a file.
    """
    name = f"{digest(identity)[:32]}.jsonl"
    text = str(setting)
    if setting is True or text == "auto":
        return journals_dir() / name
    path = Path(text).expanduser()
    return path / name if path.is_dir() or text.endswith(("/", os.sep)) else path


def journal_identity(request_type: str, editor_cls: type, settings: Mapping[str, Any], cases: Any) -> dict[str, Any]:
    """Everything a run's journaled answers depend on: the request type, the editor and the code it runs
    (``code_digest``), the run's settings (hyper-parameters, modes, seed, backend, model and weights, task options)
    and a digest of the cases' inputs. A journal is reused only by a run with the same identity."""
    return {
        "request_type": request_type,
        "editor": editor_cls.name,
        "code": code_digest(editor_cls),
        **settings,
        "cases": digest(cases),
    }


def code_digest(editor_cls: type) -> str:
    """Hash of the code a run's answers can depend on: the source of every ``lm_eval_xke`` module loaded in this
    process (the core, the tasks and the plugins, so a module one editor borrows from another counts), the editor's
    own package (a third-party plugin lives outside ``lm_eval_xke``) and the installed package version. A journal
    outlives no change to any of them."""
    files = {
        Path(module.__file__)
        for name, module in list(sys.modules.items())
        if (name == "lm_eval_xke" or name.startswith("lm_eval_xke.")) and getattr(module, "__file__", None)
    }
    files |= set(Path(inspect.getfile(editor_cls)).parent.rglob("*.py"))
    try:
        version = metadata.version("lm_eval_xke")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "not installed"
    sources = [[str(f), hashlib.sha256(f.read_bytes()).hexdigest()] for f in sorted(files) if f.is_file()]
    return digest([version, sources])


@dataclass(frozen=True)
class CaseEntry:
    """One finished edit case: ``answers`` of its journaled requests in order; ``edit`` what its edit cost
    (``seconds`` of the editor call it was part of, ``None`` when another case of its batch carries them) or
    why it failed (``failed``)."""

    task: str
    doc_id: int
    inputs: str
    answers: list[Any]
    edit: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.task, self.doc_id)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaseEntry:
        # lm-eval's loglikelihood answers are tuples; JSON has only lists
        answers = [tuple(a) if isinstance(a, list) else a for a in data["answers"]]
        return cls(str(data["task"]), int(data["doc_id"]), str(data["inputs"]), answers, dict(data.get("edit") or {}))


class Journal:
    """The journal file of one run identity, opened for reading back and appending."""

    def __init__(self, path: Path, identity: Mapping[str, Any]) -> None:
        self.path = path
        self.identity = json.loads(_canonical(identity))  # what the header will read back as
        self.entries: dict[tuple[str, int], CaseEntry] = {}  # read back from the file
        self.finished: set[tuple[str, int]] = set()  # read back or appended (their answers are not kept)
        path.parent.mkdir(parents=True, exist_ok=True)
        # appending mode: created when missing, every write goes to the end; kept open (and locked) for the whole call
        self._file = open(path, "a+b")  # noqa: SIM115
        try:
            _lock(self._file, path)
            self._file.seek(0)
            good_bytes = self._load(self._file.read())
        except BaseException:
            self._file.close()
            raise
        self._file.truncate(good_bytes)  # drop a torn last line, so the next append starts a line of its own
        if good_bytes == 0:
            self._write([{"journal": "lm_eval_xke", "format": FORMAT_VERSION, "identity": self.identity}])
            _fsync_dir(path.parent)
        log.info("xke journal %s: %d finished case(s) in it", path, len(self.entries))

    def get(self, task: str, doc_id: int, inputs: str) -> CaseEntry | None:
        """The journaled case, if finished; a case journaled with other inputs is an error."""
        entry = self.entries.get((task, doc_id))
        if entry is not None and entry.inputs != inputs:
            raise JournalError(
                f"journal {self.path} holds task {task} doc {doc_id} with other inputs than this run's (the prompt "
                f"or the edit case changed). {FRESH_START}"
            )
        return entry

    def append(self, entries: Iterable[CaseEntry]) -> None:
        """Write finished cases and fsync, so that they survive a crash right after."""
        entries = list(entries)
        if entries:
            self._write([{"case": asdict(e), "sha256": digest(asdict(e))} for e in entries])
            self.finished.update(e.key for e in entries)

    def close(self) -> None:
        self._file.close()

    def _write(self, records: list[dict]) -> None:
        self._file.write(b"".join((_canonical(r) + "\n").encode("utf-8") for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def _load(self, data: bytes) -> int:
        """Read the header and the finished cases; the number of bytes up to the last complete, valid line."""
        lines = data.split(b"\n")
        # every complete line ends in a newline: the piece after the last one is empty or a torn write
        complete, tail = lines[:-1], lines[-1]
        good_bytes = 0
        for number, raw in enumerate(complete, start=1):
            record = _parse(raw)
            is_last = number == len(complete) and not tail
            if record is None or (number > 1 and not _verified(record)):
                if is_last:
                    _warn_torn(self.path)
                    return good_bytes
                raise JournalError(
                    f"journal {self.path} is corrupt at line {number} (not the last line, so not a torn write). "
                    f"{FRESH_START}"
                )
            if number == 1:
                self._check_header(record)
            else:
                entry = CaseEntry.from_json(record["case"])
                self.entries[entry.key] = entry
                self.finished.add(entry.key)
            good_bytes += len(raw) + 1
        if tail:
            _warn_torn(self.path)
        return good_bytes

    def _check_header(self, header: Mapping[str, Any]) -> None:
        if header.get("journal") != "lm_eval_xke" or header.get("format") != FORMAT_VERSION:
            raise JournalError(f"{self.path} is not an lm_eval_xke journal of format {FORMAT_VERSION}. {FRESH_START}")
        theirs = header.get("identity") or {}
        differ = sorted(k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k))
        if differ:
            shown = "; ".join(
                f"{k}: journal {_short(theirs.get(k))}, this run {_short(self.identity.get(k))}" for k in differ
            )
            raise JournalError(
                f"journal {self.path} was written by a run with another configuration ({shown}); it is never reused "
                f"for a different one. {FRESH_START}"
            )


FRESH_START = (
    "To start fresh, delete or move the file, or pass journal=<another file or folder> (journal=off: no journal)."
)


def _lock(file, path: Path) -> None:
    """An exclusive lock for this run: two runs appending to one journal would interleave their lines."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise JournalError(
            f"journal {path} is in use by another run (the same command running twice?). Wait for it to finish, "
            "or pass journal=<another file or folder>."
        ) from None


def _warn_torn(path: Path) -> None:
    log.warning("xke journal %s: its last line is torn (a crash while writing); that case is computed again", path)


def _parse(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _verified(record: Mapping[str, Any]) -> bool:
    case = record.get("case")
    if not isinstance(case, dict) or record.get("sha256") != digest(case):
        return False
    try:
        CaseEntry.from_json(case)
    except (KeyError, TypeError, ValueError):
        return False
    return True


def _short(value: Any, limit: int = 120) -> str:
    text = _canonical(value)
    return text if len(text) <= limit else f"{text[:limit]}... (sha256 {digest(value)[:12]})"


def _fsync_dir(path: Path) -> None:
    """Make the new file's directory entry durable too (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
