"""Training of the editors that learn before they edit (MEND, SERAC): data, loop, checkpoints, artefact.

- Data: edit records ``{src, rephrase, alt, loc, loc_ans}`` from the MEND/EasyEdit ZsRE JSON layout or from
  ``question<TAB>answer`` files, in one language or a mixture (``en``, ``zh``, ``en+zh``; see ``read_records``).
- Loop: Adam over the editor's own parameters (the base model stays frozen), seeded shuffling that depends only on
  the seed and the step (so a resumed run sees the same batches), a tqdm bar with the loss and ETA, a validation
  metric every ``val_every`` steps, and a checkpoint (parameters, buffers, optimizer, RNG, step) every
  ``checkpoint_every`` steps: a run started again with the same output folder resumes where it stopped.
- Artefact: the output folder holds ``editor.pt`` and ``config.json`` (editor, base model name and weights
  fingerprint, hyper-parameters, training data sha256, time and peak memory). ``load_artefact`` refuses a folder
  trained for another base model.

Editors that train implement :class:`TrainableEditor`; ``lm-eval-xke train <editor>`` drives them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol
from weakref import WeakKeyDictionary

import torch
from tqdm import tqdm

from lm_eval_xke.editors import EditorError, HyperParams, available_editors, build_hparams, get_editor
from lm_eval_xke.stats import torch_save_atomic, weights_fingerprint

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "editor.pt"
CHECKPOINT_FILE = "checkpoint.pt"
#: Default training files per language, relative to the shared data folder (``XKE_DATA_DIR``).
DEFAULT_DATA = {"en": "train/zsre_mend_train_en_10000.json", "zh": "train/zsre_mend_train_zh_10000.txt"}
LANG_MIXTURES = ("en", "zh", "en+zh")
#: Editors that ``lm-eval-xke train`` offers (each implements ``TrainableEditor``).
#: Training options that may differ when a run is resumed (the others must match its checkpoint).
RESUME_MAY_CHANGE = ("steps", "val_every", "checkpoint_every")


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainRecord:
    """One training edit: ask ``src``, want ``alt``; ``rephrase`` asks the same; ``loc`` is unrelated.

    ``index`` is the record's position in its file; ``translations`` are the ``src`` of the records with the same
    index in the other languages' files when those files are parallel (see ``load_records``).
    """

    src: str
    rephrase: str
    alt: str
    loc: str
    loc_ans: str
    lang: str
    index: int
    translations: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataSource:
    path: Path
    lang: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def data_sources(langs: str, data: Sequence[str] = ()) -> list[DataSource]:
    """The files to train on: ``data`` entries ``LANG=PATH`` (or a path whose name says en/zh/chinese), else the
    default file of each language of the mixture ``langs``."""
    if langs not in LANG_MIXTURES:
        raise EditorError(f"langs must be one of {', '.join(LANG_MIXTURES)}, got {langs!r}")
    if data:
        return [_parse_source(entry) for entry in data]
    from lm_eval_xke.data import DATA_ENV

    root = os.environ.get(DATA_ENV)
    sources = []
    for lang in langs.split("+"):
        path = Path(root or ".") / DEFAULT_DATA[lang]
        if not path.is_file():
            raise EditorError(
                f"default {lang} training file {DEFAULT_DATA[lang]} not found under {DATA_ENV}={root or 'not set'}: "
                "set it to the shared data folder or pass --data LANG=PATH"
            )
        sources.append(DataSource(path, lang))
    return sources


def _parse_source(entry: str) -> DataSource:
    lang, sep, path = entry.partition("=")
    if not sep:
        path, lang = entry, _lang_from_name(Path(entry).name)
    if lang not in ("en", "zh"):
        raise EditorError(f"--data {entry!r}: the language must be en or zh (write en=PATH or zh=PATH)")
    if not Path(path).is_file():
        raise EditorError(f"--data {entry!r}: file {path} does not exist")
    return DataSource(Path(path), lang)


def _lang_from_name(name: str) -> str:
    if "chinese" in name or re.search(r"(^|[_.-])zh([_.-]|$)", name):
        return "zh"
    if re.search(r"(^|[_.-])en([_.-]|$)", name):
        return "en"
    raise EditorError(f"cannot tell the language of training file {name}: pass it as en=PATH or zh=PATH")


def read_records(source: DataSource) -> list[TrainRecord]:
    """Records of a ``.json`` list in the ZsRE layout, or of a ``question<TAB>answer`` ``.txt`` file.

    A tab file has no paraphrase and no locality pair: the rephrase is the question itself, and the locality pair of
    record i is the question and answer of record ``(i + n // 2) % n`` of the same file, an unrelated fact.
    """
    text = source.path.read_text(encoding="utf-8")
    if source.path.suffix == ".json":
        items = json.loads(text)
        try:
            return [
                TrainRecord(r["src"], r["rephrase"], r["alt"], r["loc"], r["loc_ans"], source.lang, i)
                for i, r in enumerate(items)
            ]
        except (KeyError, TypeError) as err:
            raise EditorError(f"{source.path}: every record needs src, rephrase, alt, loc, loc_ans ({err})") from None
    pairs = [line.split("\t") for line in text.splitlines() if line.strip()]
    bad = [i for i, pair in enumerate(pairs) if len(pair) != 2]
    if bad or not pairs:
        raise EditorError(f"{source.path}: expected question<TAB>answer lines (line {bad[0] + 1 if bad else 1})")
    n = len(pairs)
    return [
        TrainRecord(q.strip(), q.strip(), a.strip(), *[x.strip() for x in pairs[(i + n // 2) % n]], source.lang, i)
        for i, (q, a) in enumerate(pairs)
    ]


def load_records(sources: Sequence[DataSource]) -> list[TrainRecord]:
    """The records of every source. Files of different languages with the same number of records are taken as
    parallel (the default ``en`` and ``zh`` training files are line-by-line translations of one another), and each
    record gets the questions of its counterparts as ``translations``: cross-lingual positives for SERAC."""
    per_source = [read_records(source) for source in sources]
    records = []
    for records_here in per_source:
        parallel = [
            other for other in per_source if len(other) == len(records_here) and other[0].lang != records_here[0].lang
        ]
        records += [
            dataclasses.replace(r, translations=tuple(other[r.index].src for other in parallel)) for r in records_here
        ]
    return records


def data_fingerprint(sources: Sequence[DataSource]) -> str:
    """sha256 over each file's language and content hash: what the artefact was trained on."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(f"{source.lang}:{source.sha256}\n".encode())
    return digest.hexdigest()


def split_validation(records: Sequence[TrainRecord], size: int, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``size`` records are held out for the validation metric."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in order[:size]]


def batch_at(records: Sequence[TrainRecord], step: int, batch_size: int, seed: int) -> list[TrainRecord]:
    """The batch of ``step``: epochs walk through seeded permutations, so the batch depends on (seed, step) only."""
    start = step * batch_size
    batch = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, len(records))
        order = list(range(len(records)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        batch.append(records[order[offset]])
    return batch


# ---------------------------------------------------------------- the trainable side of an editor


@dataclass
class TrainHyperParams(HyperParams):
    """What every training run has; editors extend it with their own fields."""

    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=1, metadata={"help": "training records per step"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the editor's parameters"})
    seed: int = field(default=0, metadata={"help": "seed of the shuffling, the held-out split and the init"})
    val_every: int = field(default=100, metadata={"help": "print the validation metric every this many steps"})
    val_size: int = field(default=20, metadata={"help": "held-out records of the validation metric"})
    checkpoint_every: int = field(default=100, metadata={"help": "save a resumable checkpoint every this many steps"})


class Trainable(torch.nn.Module):
    """The learned part of an editor; the base model it serves is frozen and not among its parameters."""

    def loss(self, records: Sequence[TrainRecord]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def validate(self, records: Sequence[TrainRecord]) -> dict[str, float]:
        raise NotImplementedError

    def optimizer_groups(self, hp: TrainHyperParams) -> list[dict]:
        """Adam parameter groups; editors with parameters that need their own learning rate override it."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]


class TrainableEditor(Protocol):
    """An editor class that can be trained: ``lm-eval-xke train <name>`` calls ``make_trainable``."""

    name: ClassVar[str]
    train_hparams_class: ClassVar[type[TrainHyperParams]]
    #: overrides of the training defaults per ``model.config.model_type`` (where to edit, per family)
    train_family_defaults: ClassVar[dict[str, dict[str, Any]]]

    @classmethod
    def make_trainable(cls, model, tokenizer, hp: TrainHyperParams) -> Trainable: ...


def is_trainable(cls: type) -> bool:
    """Whether an editor class declares a training step (``TrainableEditor``)."""
    return hasattr(cls, "train_hparams_class") and hasattr(cls, "make_trainable")


def trainable_editors() -> list[str]:
    """The registered editors that declare a training step, third-party ones included (loads every editor class)."""
    return [name for name in available_editors() if is_trainable(get_editor(name))]


def trainable_editor(name: str) -> type:
    cls = get_editor(name)
    if not is_trainable(cls):
        raise EditorError(f"editor '{name}' has no training step; trainable editors: {', '.join(trainable_editors())}")
    return cls


# ---------------------------------------------------------------- the loop


@dataclass
class TrainOutcome:
    steps: int
    losses: list[float]
    validation: dict[str, float]
    seconds: float


def train(
    trainable: Trainable,
    train_records: Sequence[TrainRecord],
    val_records: Sequence[TrainRecord],
    hp: TrainHyperParams,
    out: Path,
    identity: Mapping[str, Any],
) -> TrainOutcome:
    """Train ``trainable`` for ``hp.steps`` steps, resuming from ``out/checkpoint.pt`` when it exists.

    ``identity`` (base model, data hash, hyper-parameters) is stored in the checkpoint; a checkpoint of another
    identity is refused rather than resumed. Only the step count and the reporting intervals may change on resume.
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(hp.seed)
    optimizer = torch.optim.Adam(trainable.optimizer_groups(hp), lr=hp.lr)
    state = {"step": 0, "losses": [], "seconds": 0.0}
    checkpoint = out / CHECKPOINT_FILE
    identity = {**identity, "hparams": {k: v for k, v in hp.to_dict().items() if k not in RESUME_MAY_CHANGE}}
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False)
        if saved["identity"] != identity:
            raise EditorError(
                f"{checkpoint} belongs to another training run (base model, data or hyper-parameters differ: "
                f"{_differences(saved['identity'], identity)}); use another --out folder or delete the checkpoint"
            )
        trainable.load_state_dict(saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
        tqdm.write(f"resuming from {checkpoint} at step {state['step']}")
    started = time.perf_counter() - state["seconds"]
    bar = tqdm(total=hp.steps, initial=state["step"], desc="train", dynamic_ncols=True)
    trainable.train()
    while state["step"] < hp.steps:
        loss, stats = trainable.loss(batch_at(train_records, state["step"], hp.batch_size, hp.seed))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["step"] += 1
        state["losses"].append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{state['losses'][-1]:.4f}", **{k: f"{v:.3f}" for k, v in stats.items()})
        if val_records and state["step"] % hp.val_every == 0 and state["step"] < hp.steps:
            _validate(trainable, val_records, state["step"])
        if state["step"] % hp.checkpoint_every == 0 and state["step"] < hp.steps:
            state["seconds"] = time.perf_counter() - started
            torch_save_atomic(
                {
                    "trainable": trainable.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "state": state,
                    "identity": identity,
                },
                checkpoint,
            )
    bar.close()
    validation = _validate(trainable, val_records, state["step"]) if val_records else {}
    trainable.eval()
    return TrainOutcome(state["step"], state["losses"], validation, time.perf_counter() - started)


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    flat_saved = {**saved, **saved.get("hparams", {})}
    flat_current = {**current, **current.get("hparams", {})}
    keys = sorted(k for k in set(flat_saved) | set(flat_current) if k != "hparams")
    return ", ".join(
        f"{k} {flat_saved.get(k)!r} -> {flat_current.get(k)!r}"
        for k in keys
        if flat_saved.get(k) != flat_current.get(k)
    )


def _validate(trainable: Trainable, records: Sequence[TrainRecord], step: int) -> dict[str, float]:
    """The editor's validation metric on the held-out records, printed."""
    trainable.eval()
    try:
        validation = trainable.validate(records)
    finally:
        trainable.train()
    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in validation.items()))
    return validation


# ---------------------------------------------------------------- the artefact


def base_model_identity(model) -> dict[str, str]:
    return {
        "name_or_path": str(getattr(model.config, "name_or_path", "")),
        "model_type": str(getattr(model.config, "model_type", "")),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "weights_fingerprint": weights_fingerprint(model),
    }


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated GPU memory when CUDA was used."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_artefact(
    out: Path, editor: str, model, trainable: Trainable, hp: TrainHyperParams, sources, outcome: TrainOutcome
) -> dict:
    """Write ``editor.pt`` and ``config.json``; the checkpoint is removed once the artefact is complete."""
    config = {
        "format": FORMAT_VERSION,
        "editor": editor,
        "base_model": base_model_identity(model),
        "hparams": hp.to_dict(),
        "training_data": {
            "sha256": data_fingerprint(sources),
            "files": [{"path": str(s.path), "lang": s.lang, "sha256": s.sha256} for s in sources],
        },
        "result": {
            "steps": outcome.steps,
            # means over the first and the last tenth of the steps: single-step losses are as noisy as their batch
            "first_loss": _mean(outcome.losses[: max(1, len(outcome.losses) // 10)]),
            "last_loss": _mean(outcome.losses[-max(1, len(outcome.losses) // 10) :]),
            "validation": outcome.validation,
            "seconds": round(outcome.seconds, 1),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        },
    }
    torch_save_atomic(trainable.state_dict(), out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return config


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def load_artefact(path: str | Path, model, editor: str) -> tuple[dict, dict]:
    """(config, state_dict) of a trained editor folder, refused unless it was trained for ``editor`` on this model."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise EditorError(
            f"editor_checkpoint {folder} is not a trained {editor} folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            f"train one with `lm-eval-xke train {editor} --pretrained MODEL --out {folder}`"
        )
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("editor") != editor:
        raise EditorError(f"editor_checkpoint {folder} holds a '{config.get('editor')}' editor, not '{editor}'")
    trained, here = config["base_model"], base_model_identity(model)
    if trained["weights_fingerprint"] != here["weights_fingerprint"]:
        raise EditorError(
            f"editor_checkpoint {folder} was trained for base model {trained['name_or_path']} ({trained['dtype']}, "
            f"weights {trained['weights_fingerprint'][:12]}), but this model is {here['name_or_path']} "
            f"({here['dtype']}, weights {here['weights_fingerprint'][:12]}). A trained {editor} only fits the exact "
            f"weights it was trained on: load the model with dtype={trained['dtype']}, or train one for this model "
            f"with `lm-eval-xke train {editor} --pretrained {here['name_or_path']}`"
        )
    return config, torch.load(folder / WEIGHTS_FILE, weights_only=True)


def load_trainable(cls, path: str | Path, model, tokenizer) -> Trainable:
    """The trained editor of folder ``path``, rebuilt from its hyper-parameters for ``model`` (checked first)."""
    config, state = load_artefact(path, model, cls.name)
    hp = build_hparams(cls.train_hparams_class, config["hparams"], source=f"{path}/{CONFIG_FILE}")
    trainable = cls.make_trainable(model, tokenizer, hp)
    trainable.load_state_dict(state)
    return trainable.to(next(model.parameters()).device).eval()


class LoadedTrainables:
    """The trained folders an editor has loaded, per base model; each is checked against the model once, on loading."""

    def __init__(self, editor_cls: type, what: str) -> None:
        self._editor_cls = editor_cls
        self._what = what  # what the folder holds, for the missing-checkpoint message
        self._loaded: WeakKeyDictionary = WeakKeyDictionary()

    def get(self, model, tokenizer, checkpoint: str | None) -> Trainable:
        name = self._editor_cls.name
        if not checkpoint:
            raise EditorError(
                f"editor {name!r} needs a trained {self._what}: set editor_checkpoint=DIR, a folder written by "
                f"`lm-eval-xke train {name} --pretrained MODEL --out DIR`"
            )
        per_model = self._loaded.setdefault(model, {})
        if checkpoint not in per_model:
            per_model[checkpoint] = load_trainable(self._editor_cls, checkpoint, model, tokenizer)
        return per_model[checkpoint]


# ---------------------------------------------------------------- command line


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an editor that learns before it edits (MEND, SERAC, or a plugin declaring a training step); "
        "resumable, writes a checkpoint folder",
    )
    editors = p.add_subparsers(dest="editor", required=True)
    for name in trainable_editors():
        cls = get_editor(name)
        q = editors.add_parser(name, help=(cls.__doc__ or name).split("\n")[0])
        q.add_argument("--pretrained", required=True, help="HF model folder or name, or an offline model name")
        q.add_argument("--out", required=True, help="output folder; an interrupted run in it resumes")
        q.add_argument("--langs", default="en", choices=LANG_MIXTURES, help="language mixture of the training data")
        q.add_argument(
            "--data",
            action="append",
            default=[],
            help="training file LANG=PATH (repeatable; .json ZsRE records or question<TAB>answer .txt); "
            f"default: $XKE_DATA_DIR/{DEFAULT_DATA['en']} and/or {DEFAULT_DATA['zh']} per --langs",
        )
        q.add_argument("--dtype", default="float32", help="dtype the base model is loaded in (edit in the same one)")
        q.add_argument("--device", default="cpu")
        for f in dataclasses.fields(cls.train_hparams_class):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            q.add_argument(
                f"--{f.name.replace('_', '-')}",
                dest=f"hp_{f.name}",
                metavar=f.name.upper(),
                help=f"{f.metadata.get('help', '')} (default: {default})",
            )
        q.set_defaults(func=_train_command)


def _train_command(args) -> int:
    from lm_eval_xke import offline_models

    cls = trainable_editor(args.editor)
    sources = data_sources(args.langs, args.data)
    model, tokenizer, _ = offline_models.load_pretrained(args.pretrained, args.dtype, args.device)
    model.requires_grad_(False)  # only the editor learns; no gradients are kept for the base weights
    values = dict(cls.train_family_defaults.get(model.config.model_type, {}))
    values.update({k[3:]: v for k, v in vars(args).items() if k.startswith("hp_") and v is not None})
    hp = build_hparams(cls.train_hparams_class, values, source=f"training of '{args.editor}'")
    records = load_records(sources)
    train_records, val_records = split_validation(records, hp.val_size, hp.seed)
    torch.manual_seed(hp.seed)  # the editor's initialisation
    trainable = cls.make_trainable(model, tokenizer, hp)
    out = Path(args.out)
    print(f"training {args.editor} on {len(train_records)} records ({args.langs}), {hp.steps} steps -> {out}")
    identity = {"base_model": str(model.config.name_or_path), "data_sha256": data_fingerprint(sources)}
    outcome = train(trainable, train_records, val_records, hp, out, identity)
    config = save_artefact(out, args.editor, model, trainable, hp, sources, outcome)
    result = config["result"]
    print(
        f"done: loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}, {result['seconds']} s, "
        f"peak memory {result['peak_memory_mb']} MB; use editor={args.editor},editor_checkpoint={out}"
    )
    return 0


class RunningNorm(torch.nn.Module):
    """Per-dimension running mean and standard deviation (Welford); MEND normalises ``u`` and ``delta`` with it.

    Updated on every training batch and frozen at edit time, as in the paper's code.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n = x.shape[0]
        batch_mean = x.mean(0)
        total = self.count + n
        shift = batch_mean - self.mean
        self.m2 += ((x - batch_mean) ** 2).sum(0) + shift**2 * self.count * n / total
        self.mean += shift * n / total
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt().float()
        return (x - self.mean.float()) / (std + 1e-7)
