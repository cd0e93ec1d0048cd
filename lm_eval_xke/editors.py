"""Editor plugins: the protocol, the applied-edit handle, hyper-parameters and the registry.

An editor is a class registered under the entry-point group ``lm_eval_xke.editors``. Built-in
editors are registered there by this package's own ``setup.cfg``, exactly as a third-party
plugin would be. ``Editor.apply`` returns an :class:`AppliedEdit`, which knows how to undo
itself and, for weight editors, exposes its change as low-rank factors per parameter.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from lm_eval_xke.cases import EditRequest, Question

ENTRY_POINT_GROUP = "lm_eval_xke.editors"


class EditorError(ValueError):
    """A problem with the editor choice or its hyper-parameters, worded for the user."""


@dataclass(frozen=True)
class WeightDelta:
    """A change ``dW = b @ a`` of one parameter, in the parameter's own layout (LoRA convention).

    ``b`` is ``[rows, rank]`` and ``a`` is ``[rank, cols]`` where ``[rows, cols]`` is the shape of
    ``model.get_parameter(parameter)``.
    """

    parameter: str
    b: Any  # torch.Tensor, typed loosely so that importing this module stays torch-free
    a: Any

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def dense(self):
        return self.b @ self.a


class AppliedEdit:
    """A handle on an edit that has been applied to a model.

    ``restore()`` undoes it exactly. Weight editors fill ``deltas``; prompt editors set ``prompt_transform``
    (the rendered prompt in, the prompt to answer out) or, when the rewrite depends on what is asked (its language,
    its role), ``question_transform``, which also gets the :class:`~lm_eval_xke.cases.Question`; memory editors may
    install forward wrappers and undo them in ``restore``.
    """

    def __init__(
        self,
        restore: Callable[[], None] | None = None,
        deltas: Sequence[WeightDelta] = (),
        prompt_transform: Callable[[str], str] | None = None,
        info: Mapping[str, Any] | None = None,
        question_transform: Callable[[str, Question], str] | None = None,
    ) -> None:
        if prompt_transform is not None and question_transform is not None:
            raise ValueError("an edit rewrites prompts with prompt_transform or question_transform, not both")
        self._restore = restore
        self.deltas = tuple(deltas)
        self.prompt_transform = prompt_transform
        self.question_transform = question_transform
        self.info = dict(info or {})
        self.restored = False

    @property
    def rewrites_prompts(self) -> bool:
        return self.prompt_transform is not None or self.question_transform is not None

    def rewrite(self, prompt: str, question: Question) -> str:
        """The prompt to answer ``question`` with under this edit (``prompt`` as rendered by the task)."""
        if self.question_transform is not None:
            return self.question_transform(prompt, question)
        if self.prompt_transform is not None:
            return self.prompt_transform(prompt)
        return prompt

    def restore(self) -> None:
        if self.restored:
            return
        if self._restore is not None:
            self._restore()
        self.restored = True


def restore_all(edits: Sequence[AppliedEdit]) -> None:
    """Undo edits applied one after another, newest first: the oldest handle holds the weights as they were."""
    for edit in reversed(edits):
        edit.restore()


def combined_edit(applied: Sequence[AppliedEdit], info: Mapping[str, Any] | None = None) -> AppliedEdit:
    """One handle for edits applied one after another: restores them all and lists their deltas in the order they
    were added (added back in that order they give the very same weights; merged per weight they would round
    differently, and a resumed held set would be refused)."""
    applied = list(applied)
    return AppliedEdit(restore=lambda: restore_all(applied), deltas=[d for a in applied for d in a.deltas], info=info)


def apply_weight_deltas(model, deltas: Sequence[WeightDelta], info: Mapping[str, Any] | None = None) -> AppliedEdit:
    """Add each delta to its parameter in place; the returned edit restores the saved originals bit-exactly."""
    import torch

    originals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for delta in deltas:
            param = model.get_parameter(delta.parameter)
            update = delta.dense().to(device=param.device, dtype=torch.float32)
            if update.shape != param.shape:
                raise ValueError(
                    f"delta for {delta.parameter} has shape {tuple(update.shape)}, parameter has {tuple(param.shape)}"
                )
            originals.setdefault(delta.parameter, param.detach().clone())
            # add in float32 and round once, so low-precision weights get the closest representable result
            param.copy_((param.float() + update).to(param.dtype))

    def restore() -> None:
        with torch.no_grad():
            for name, original in originals.items():
                model.get_parameter(name).copy_(original)

    return AppliedEdit(restore=restore, deltas=deltas, info=info)


@dataclass
class HyperParams:
    """Base class of editor hyper-parameters. Subclasses are dataclasses whose fields carry ``help`` metadata.

    A layer field whose default was chosen for a model of a given depth says so with ``reference_depth`` in its
    metadata (e.g. ``metadata={"help": ..., "reference_depth": 32}``): the default is then placed at the same relative
    depth of the loaded model (see :class:`AtDepth`).
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AtDepth:
    """Layer index(es) chosen for a model of ``of`` blocks, to be placed at the same relative depth of another.

    Family defaults use it so that one setting serves every depth of a family: ``AtDepth(5, of=32)`` is layer 5 of a
    32-block model, 2 of a 10-block one. A single layer maps to ``round(layer * n / of)``; a contiguous range maps its
    two ends and keeps every layer between them (MEMIT's 4-8 of 32 is 1-2 of 10); other lists map each layer.
    Results stay inside ``0..n-1``. Python's ``round`` (ties to even) is the rounding.
    """

    layers: int | tuple[int, ...]
    of: int

    def resolve(self, num_layers: int | None) -> int | list[int]:
        """The indexes for a model of ``num_layers`` blocks; None: as given (the reference model's)."""
        if num_layers is None:
            return self.layers if isinstance(self.layers, int) else list(self.layers)
        if isinstance(self.layers, int):
            return self._place(self.layers, num_layers)
        layers = list(self.layers)
        if layers and layers == list(range(layers[0], layers[-1] + 1)):
            return list(range(self._place(layers[0], num_layers), self._place(layers[-1], num_layers) + 1))
        return sorted({self._place(layer, num_layers) for layer in layers})

    def _place(self, layer: int, num_layers: int) -> int:
        return min(num_layers - 1, max(0, round(layer * num_layers / self.of)))


#: One case's edit, computed but not applied: calling it applies the edit and returns its handle.
EditPlan = Callable[[], AppliedEdit]


class Editor(ABC):
    """A knowledge-editing method.

    Subclasses set ``name``, ``hparams_class`` and optionally ``family_defaults`` (overrides of the
    dataclass defaults per ``model.config.model_type``), ``presets`` (named sets of hyper-parameters that reproduce
    another implementation's procedure, the ``preset`` model_arg), ``supports_batch`` and ``supports_parallel`` (with
    ``plan_parallel``). One instance serves a whole run, so it may cache per-model work (context templates,
    statistics).
    """

    name: ClassVar[str]
    hparams_class: ClassVar[type[HyperParams]]
    family_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: preset name -> hyper-parameter values, applied over the family defaults (e.g. ``easyedit``: EasyEdit's run)
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    supports_batch: ClassVar[bool] = False
    #: Why batch editing is not possible, shown to users who ask for it.
    batch_unsupported_reason: ClassVar[str] = "the method edits one fact at a time"

    #: Whether ``plan_parallel`` computes several cases' single-mode edits at once (the ``edit_parallel`` model_arg).
    supports_parallel: ClassVar[bool] = False
    #: Whether an edit is wholly its ``deltas``: no state beside the weights (AlphaEdit's preserved keys, GRACE's
    #: codebook, FT's dense copy). A held edit set killed half-way then resumes by adding the journaled deltas back.
    replayable: ClassVar[bool] = False

    @abstractmethod
    def apply(self, model, tokenizer, requests: Sequence[EditRequest], hparams: HyperParams) -> AppliedEdit:
        """Edit ``model`` so that it states every request; return the handle that undoes it."""

    def prepare(self, model, tokenizer, hparams: HyperParams) -> None:
        """Do now, on the model as it is, the per-model work later edits reuse (statistics, context templates). A
        resumed held edit set calls it before adding its journaled edits back, so that its later edits see what a
        whole run's saw: the unedited model. Editors that reuse nothing need not override it."""
        return None  # an optional hook: nothing to do by default

    def typed_hparams(self, hparams: HyperParams) -> HyperParams:
        """``hparams`` if it is of this editor's ``hparams_class``, else an EditorError naming both classes (the
        first check of every ``check_hparams``)."""
        if not isinstance(hparams, self.hparams_class):
            raise EditorError(f"editor '{self.name}' needs {self.hparams_class.__name__}, got {type(hparams).__name__}")
        return hparams

    def plan_parallel(
        self, model, tokenizer, cases: Sequence[Sequence[EditRequest]], hparams: HyperParams
    ) -> list[EditPlan]:
        """Compute the edits of several cases against the unedited model, without applying any: one plan per case.

        Calling a case's plan applies what ``apply(model, tokenizer, case, hparams)`` would apply to the unedited
        model and returns its handle; the caller restores it before calling the next plan. Editors whose
        single-mode edits are independent of each other set ``supports_parallel`` and share the work between the
        cases here (e.g. one batched optimisation for all of them).
        """
        raise EditorError(f"editor '{self.name}' cannot plan edits in parallel; editors that can: {parallel_editors()}")

    def report(self) -> dict[str, Any]:
        """What the editor measured over the run (e.g. a retriever's accuracy), for ``config.xke.editor_report``;
        empty by default. Counted over the questions this process answered (not those read from a journal)."""
        return {}

    def resolve_hparams(
        self,
        model_type: str,
        config_file: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        num_layers: int | None = None,
        preset: str | None = None,
    ) -> HyperParams:
        """Dataclass defaults < family defaults for ``model_type`` < ``presets[preset]`` < YAML ``config_file`` <
        ``overrides``.

        Defaults given at a reference depth (:class:`AtDepth` family defaults, fields with ``reference_depth``) are
        placed at the same relative depth of a model of ``num_layers`` blocks (None: left at the reference model's);
        values from the file and the overrides are taken as they are.
        """
        defaults = {**depth_relative_defaults(self.hparams_class), **self.family_defaults.get(model_type, {})}
        values: dict[str, Any] = {
            name: value.resolve(num_layers) if isinstance(value, AtDepth) else value for name, value in defaults.items()
        }
        if preset is not None:
            if preset not in self.presets:
                raise EditorError(
                    f"editor '{self.name}' has no preset {preset!r}; its presets: {', '.join(self.presets) or '(none)'}"
                    f". Editors with presets: {preset_editors()}"
                )
            values.update(self.presets[preset])
        if config_file is not None:
            from_file = _read_yaml_mapping(Path(config_file))
            # checked alone first, so that a bad key or value in the file is reported with the file's name
            build_hparams(self.hparams_class, from_file, source=f"editor '{self.name}' (editor_config {config_file})")
            values.update(from_file)
        values.update(overrides or {})
        return build_hparams(self.hparams_class, values, source=f"editor '{self.name}'")


def hparam_fields(cls: type[HyperParams]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def depth_relative_defaults(cls: type[HyperParams]) -> dict[str, AtDepth]:
    """The dataclass defaults of ``cls``'s fields that declare a ``reference_depth``, as :class:`AtDepth`."""
    relative = {}
    for name, f in hparam_fields(cls).items():
        if "reference_depth" in f.metadata:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            layers = default if isinstance(default, int) else tuple(default)
            relative[name] = AtDepth(layers, of=f.metadata["reference_depth"])
    return relative


def build_hparams(cls: type[HyperParams], values: Mapping[str, Any], source: str) -> HyperParams:
    """Instantiate ``cls`` from ``values``, coercing strings and naming any unknown or ill-typed key."""
    fields = hparam_fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise EditorError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for {source}; valid ones: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    coerced = {name: _coerce(value, hints[name], name, source) for name, value in values.items()}
    return cls(**coerced)


def _coerce(value: Any, hint: Any, name: str, source: str) -> Any:
    """Turn model_args strings (``"5"``, ``"4|5|6"``, ``"true"``) into the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    try:
        if origin in (typing.Union, types.UnionType):
            if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
                return None
            inner = [a for a in args if a is not type(None)]
            return _coerce(value, inner[0], name, source)
        if origin in (list, tuple):
            items = (
                value
                if isinstance(value, (list, tuple))
                else [v for v in str(value).replace(";", "|").split("|") if v != ""]
            )
            item_type = args[0] if args else str
            return [_coerce(v, item_type, name, source) for v in items]
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise EditorError(f"hyper-parameter '{name}' of {source} must be {_type_name(hint)}, got {value!r}") from None
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise EditorError(
            f"editor_config file {path} does not exist: pass the path of a YAML file of hyper-parameters "
            "(name: value per line), or drop editor_config"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = " ".join(str(err).split())  # PyYAML's message spans lines: keep the error on one line
        problem = f"editor_config file {path} is not valid YAML ({where}); fix it or drop editor_config"
        raise EditorError(problem) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EditorError(
            f"editor_config file {path} must hold a mapping of hyper-parameter names to values "
            f"(name: value per line), got {type(data).__name__}"
        )
    return data


def edited_module(model, module_name: str, method: str):
    """The linear module (``nn.Linear`` or GPT-2's ``Conv1D``) called ``module_name``; an EditorError names the fix."""
    import torch

    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        layers = getattr(model.config, "num_hidden_layers", "?")
        raise EditorError(
            f"module {module_name!r} not found (model_type {model.config.model_type!r}, {layers} layers); "
            "set module_template and layer"
        ) from None
    if not isinstance(module, torch.nn.Linear) and type(module).__name__ != "Conv1D":
        raise EditorError(f"{method} edits or wraps a linear module; {module_name} is a {type(module).__name__}")
    return module


# ---------------------------------------------------------------- registry

_runtime_editors: dict[str, type[Editor]] = {}


@cache
def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register_editor(name: str, cls: type[Editor]) -> None:
    """Register an editor class at run time (notebooks, tests). Installed plugins use the entry-point group."""
    _runtime_editors[name] = cls


def available_editors() -> list[str]:
    return sorted(set(_entry_points()) | set(_runtime_editors))


def preset_editors() -> str:
    """The registered editors with presets and their names (``rome (easyedit)``), comma-separated."""
    with_presets = [(name, get_editor(name).presets) for name in available_editors()]
    return ", ".join(f"{name} ({'|'.join(presets)})" for name, presets in with_presets if presets) or "none"


def parallel_editors() -> str:
    """The registered editors that support ``edit_parallel``, comma-separated (loads every editor class)."""
    return ", ".join(name for name in available_editors() if get_editor(name).supports_parallel) or "none"


def get_editor(name: str) -> type[Editor]:
    if name in _runtime_editors:
        return _runtime_editors[name]
    ep = _entry_points().get(name)
    if ep is None:
        raise EditorError(
            f"unknown editor '{name}'; available editors: {', '.join(available_editors())}. "
            f"Third-party editors register under the entry-point group '{ENTRY_POINT_GROUP}'."
        )
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Editor)):
        raise EditorError(f"entry point '{name}' ({ep.value}) does not name an Editor subclass")
    return cls
