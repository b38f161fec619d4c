"""One typed, validated view of ``params.yaml``.

Every stage calls :func:`load_params` first. The sections are frozen pydantic dataclasses
(plain dataclasses to the code that uses them), checked by pydantic in its strict JSON mode:
unknown keys, wrong types (no ``"1"`` for an integer; an integer is a valid float, a list
becomes a tuple) and the range checks (validators of each section) raise :class:`ConfigError`,
whose message starts with the key and says what is allowed, before any work starts.
:func:`parse` is the same checker for any such dataclass (the typed hand-off files use it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass
from pydantic_core import PydanticCustomError

from pipeline.errors import PipelineError
from pipeline.hashing import sha256_bytes

T = TypeVar("T")


def typed(cls: type[T]) -> type[T]:
    """A frozen dataclass that pydantic validates: unknown keys are refused. Built in code it
    converts as pydantic's lax mode does (a list to a tuple); read from a file by :func:`parse`
    it is strict."""
    return _pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)


def _check(ok: bool, key: str, message: str) -> None:
    """A range check inside a validator: the error names ``key`` (the full dotted key)."""
    if not ok:
        raise PydanticCustomError("param", "{key}: {message}", {"key": key, "message": message})


class ConfigError(PipelineError, ValueError):
    """A parameter in params.yaml is unknown, of the wrong type or out of range."""


@typed
class DataConfig:
    source: Literal["demo", "food101", "imagefolder"] = "demo"
    root: str | None = None  # required for food101/imagefolder; ignored for demo
    download: bool = False  # food101 only: fetch with torchvision when missing
    image_size: int = 128
    test_fraction: float = 0.25  # imagefolder only: seeded train/test split of each class
    seed: int = 0  # imagefolder train/test split

    @model_validator(mode="after")
    def _ranges(self) -> DataConfig:
        _check(self.image_size >= 16, "data.image_size", "must be >= 16 pixels")
        _check(0 < self.test_fraction < 1, "data.test_fraction", "must lie in (0, 1)")
        _check(self.source == "demo" or bool(self.root), "data.root",
               f"required for data.source={self.source!r}: the folder holding the images")
        return self


@typed
class DemoConfig:
    classes: int = 20
    train_per_class: int = 750
    test_per_class: int = 250
    min_side: int = 144
    max_side: int = 192
    seed: int = 101

    @model_validator(mode="after")
    def _ranges(self) -> DemoConfig:
        # The upper bound (one class per built-in recipe) is checked by the demo generator,
        # at the start of `prepare`: this module does not import it.
        _check(self.classes >= 2, "demo.classes", "must be >= 2")
        _check(self.train_per_class >= 1, "demo.train_per_class", "must be >= 1")
        _check(self.test_per_class >= 1, "demo.test_per_class", "must be >= 1")
        _check(self.min_side >= 32, "demo.min_side", "must be >= 32 pixels")
        _check(self.max_side >= self.min_side, "demo.max_side", "must be >= demo.min_side")
        return self


ALL = "all"  # sample.size / sample.test_size: the whole list


@typed
class SampleConfig:
    size: Union[int, Literal["all"]] = 10_000  # noqa: UP007 - "all": every readable image
    test_size: Union[int, Literal["all"]] = 1_000  # noqa: UP007 - of the train / test list
    unlabeled_size: int = 50
    classes: Union[str, int, tuple[str, ...]] = "all"  # noqa: UP007 - "all", a count, a list
    seed: int = 42

    @model_validator(mode="after")
    def _ranges(self) -> SampleConfig:
        _check(self.size == ALL or self.size >= 2, "sample.size",
               "must be 'all' or a positive count >= 2")
        _check(self.test_size == ALL or self.test_size >= 1, "sample.test_size",
               "must be 'all' or a positive count")
        _check(self.unlabeled_size >= 0, "sample.unlabeled_size", "must be >= 0")
        classes = self.classes
        if isinstance(classes, str):
            _check(classes == "all", "sample.classes", "must be 'all', a count >= 2 or a list")
        elif isinstance(classes, int):
            _check(classes >= 2, "sample.classes", "a count of classes must be >= 2")
        else:
            _check(len(classes) >= 2, "sample.classes", "a list needs at least 2 class names")
            _check(len(set(classes)) == len(classes), "sample.classes", "names must be unique")
        return self


@typed
class SplitConfig:
    val_fraction: float = 0.2
    seed: int = 42

    @model_validator(mode="after")
    def _ranges(self) -> SplitConfig:
        _check(0 < self.val_fraction < 1, "split.val_fraction", "must lie in (0, 1)")
        return self


@typed
class ModelConfig:
    arch: Literal["resnet50"] = "resnet50"
    weights: str = "none"  # imagenet | none | path to a state dict
    freeze: Literal["backbone", "layer4", "none"] = "backbone"
    hidden: int = 512
    dropout: float = 0.2
    feature_norm: bool = True  # BatchNorm1d before the head (needed for weights=none)
    init_seed: int = 0  # random init of the backbone when weights=none

    @model_validator(mode="after")
    def _ranges(self) -> ModelConfig:
        _check(self.hidden >= 1, "model.hidden", "must be >= 1")
        _check(0 <= self.dropout < 1, "model.dropout", "must lie in [0, 1)")
        _check(bool(self.weights), "model.weights", "imagenet, none or a path to a state dict")
        return self


@typed
class TrainConfig:
    lr: float = 0.003
    epochs: int = 1
    batch_size: int = 64
    log_every: int = 20
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    augment: bool = False
    seed: int = 0
    scheduler: Literal["none", "cosine"] = "none"
    weight_decay: float = 0.0  # > 0: AdamW (decoupled weight decay)
    keep: Literal["last", "best"] = "last"  # the weights of the last or the best epoch

    @model_validator(mode="after")
    def _ranges(self) -> TrainConfig:
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        return self


@typed
class ComputeConfig:
    """Where and how fast train and evaluate compute: changes the speed, not the result
    (beyond the order of floating-point sums)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    nproc: Union[Literal["auto"], int] = 1  # noqa: UP007 - processes (DDP when > 1)
    # DataLoader decoding workers per process; auto: 0 on a CPU, from the cores on a GPU
    num_workers: Union[Literal["auto"], int] = "auto"  # noqa: UP007
    feature_batch_size: int = 16  # images per extraction batch
    compile: Literal["auto", "always", "never"] = "auto"  # torch.compile the extraction

    @model_validator(mode="after")
    def _ranges(self) -> ComputeConfig:
        _check(self.feature_batch_size >= 1, "compute.feature_batch_size", "must be >= 1")
        _check(self.num_workers == "auto" or self.num_workers >= 0,
               "compute.num_workers", "must be auto or >= 0")
        _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
               "compute.device", "one of auto, cpu, cuda, cuda:N (a GPU index), mps")
        _check(self.nproc == "auto" or self.nproc >= 1, "compute.nproc", "must be auto or >= 1")
        if self.nproc != "auto" and self.nproc > 1:  # auto: every GPU, else 1
            _check(self.device != "mps", "compute.nproc",
                   "must be 1 with compute.device=mps (DDP runs on CUDA or CPU)")
            _check(":" not in self.device, "compute.nproc",
                   f"must be 1 with compute.device={self.device} (one GPU); use "
                   "compute.device=cuda to run one process per GPU")
        return self


# Keys that moved to another section: an old `-S train.device=...` names the new key.
MOVED = {f"train.{k}": f"compute.{k}"
         for k in ("device", "nproc", "num_workers", "feature_batch_size", "compile")}


@typed
class MlflowConfig:
    experiment: str = "food101"

    @model_validator(mode="after")
    def _ranges(self) -> MlflowConfig:
        _check(bool(self.experiment), "mlflow.experiment", "must not be empty")
        return self


@typed
class RegistryConfig:
    model_name: str = "food101-resnet50"
    min_delta: float = 0.0

    @model_validator(mode="after")
    def _ranges(self) -> RegistryConfig:
        _check(bool(self.model_name), "registry.model_name", "must not be empty")
        _check(self.min_delta >= 0, "registry.min_delta", "must be >= 0")
        return self


@typed
class PredictConfig:
    model: str = "champion"  # an alias or a version number
    batch_size: int = 16

    @model_validator(mode="after")
    def _ranges(self) -> PredictConfig:
        _check(bool(self.model), "predict.model", "an alias (champion) or a version number")
        _check(self.batch_size >= 1, "predict.batch_size", "must be >= 1")
        return self


@typed
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        nproc = self.compute.nproc
        if nproc != "auto" and nproc > 1:
            _check(self.train.batch_size >= nproc, "train.batch_size",
                   "the global batch must hold at least one image per process (compute.nproc)")
        return self

    def flat(self) -> dict[str, Any]:
        """Flattened ``section.key -> value`` dict (for MLflow params and hashing)."""
        out: dict[str, Any] = {}
        for section, values in dataclasses.asdict(self).items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def digest(self) -> str:
        """A stable short hash of every parameter value."""
        blob = json.dumps(self.flat(), sort_keys=True, default=str).encode()
        return sha256_bytes(blob)[:12]


# -- reading: pydantic's strict JSON mode, its first error as one message naming the key ------


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def parse(cls: type[T], raw: Any, name: str = "", error: type[Exception] = ConfigError) -> T:
    """The typed dataclass ``cls`` from ``raw`` (parsed YAML or JSON), every value checked.

    Strict as JSON is: ``"1"`` is not an integer, ``1`` is a valid float, a list becomes a
    tuple. Unknown keys, wrong types, missing keys (fields without a default) and the range
    checks raise ``error`` with a message that starts with the key (``name.key``).
    """
    try:
        text = json.dumps(raw, default=str)  # YAML's dates and the like: as the text they were
    except (TypeError, ValueError) as exc:
        raise error(f"{name or 'params'}: not a plain mapping of values ({exc})") from None
    try:
        return _adapter(cls).validate_json(text, strict=True)
    except ValidationError as exc:
        raise error(_message(cls, raw, name, exc.errors()[0])) from None


def _fields(tp: Any) -> dict[str, Any] | None:
    if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return None
    hints = typing.get_type_hints(tp)
    return {f.name: hints[f.name] for f in dataclasses.fields(tp)}


def _message(cls: type, raw: Any, name: str, err: dict) -> str:
    """One pydantic error as ``key: what is wrong; what is allowed``."""
    if err["type"] == "param":  # a range check: its message names its key
        return err["msg"]
    tp, value, path = cls, raw, [name] if name else []
    loc = list(err["loc"])
    while loc and (fields := _fields(tp)) is not None and loc[0] in fields:
        part = loc.pop(0)
        path.append(part)
        tp = fields[part]
        value = value.get(part) if isinstance(value, dict) else None
    key = ".".join(path)
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden") and loc:
        extra = f"{key}.{loc[0]}" if key else str(loc[0])
        known = ", ".join(_fields(tp) or ())
        if not key:
            return f"{extra}: unknown section; allowed sections: {known}"
        if moved := MOVED.get(extra):
            return (f"{extra}: moved to {moved} (params.yaml section '{moved.split('.')[0]}'); "
                    f"set {moved} instead")
        return f"{extra}: unknown key; allowed keys in '{key}': {known}"
    if err["type"] == "missing":
        return f"{key}: missing"
    if _fields(tp) is not None and not isinstance(value, dict):
        return f"{key or 'params'}: expected a mapping of keys, got {value!r}"
    return f"{key}: got {value!r}, expected {_describe(tp)}"


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        return "a list of " + _describe(get_args(tp)[0])
    if origin is dict:
        return "a mapping of " + _describe(get_args(tp)[1])
    if fields := _fields(tp):
        return "a mapping with keys " + ", ".join(fields)
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, str(tp)
    )


def params_from_dict(raw: dict[str, Any] | None) -> Params:
    """Build validated :class:`Params` from a parsed params.yaml mapping."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    # An empty section (`train:` with nothing under it) is YAML's null: the defaults.
    return parse(Params, {k: {} if v is None else v for k, v in raw.items()})


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the repository root")
    with path.open() as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return params_from_dict(raw)
