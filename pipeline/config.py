"""One typed, validated view of ``params.yaml``.

Every stage calls :func:`load_params` first. Unknown keys, wrong types and impossible values
raise :class:`ConfigError` naming the key and what is allowed, before any work starts.
:func:`from_mapping` is the same checker for any dataclass (the typed hand-off files use it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from pipeline.errors import PipelineError
from pipeline.hashing import sha256_bytes


class ConfigError(PipelineError, ValueError):
    """A parameter in params.yaml is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class DataConfig:
    source: Literal["demo", "food101", "imagefolder"] = "demo"
    root: str | None = None  # required for food101/imagefolder; ignored for demo
    download: bool = False  # food101 only: fetch with torchvision when missing
    image_size: int = 128
    test_fraction: float = 0.25  # imagefolder only: seeded train/test split of each class
    seed: int = 0  # imagefolder train/test split


@dataclass(frozen=True)
class DemoConfig:
    classes: int = 20
    train_per_class: int = 750
    test_per_class: int = 250
    min_side: int = 144
    max_side: int = 192
    seed: int = 101


@dataclass(frozen=True)
class SampleConfig:
    size: int = 10_000
    test_size: int = 1_000
    unlabeled_size: int = 50
    classes: Union[str, int, list[str]] = "all"  # noqa: UP007 - "all", a count, or a list
    seed: int = 42


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float = 0.2
    seed: int = 42


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["resnet50"] = "resnet50"
    weights: str = "none"  # imagenet | none | path to a state dict
    freeze: Literal["backbone", "layer4", "none"] = "backbone"
    hidden: int = 512
    dropout: float = 0.2
    feature_norm: bool = True  # BatchNorm1d before the head (needed for weights=none)
    init_seed: int = 0  # random init of the backbone when weights=none


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ComputeConfig:
    """Where and how fast train and evaluate compute: changes the speed, not the result
    (beyond the order of floating-point sums)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    nproc: Union[Literal["auto"], int] = 1  # noqa: UP007 - processes (DDP when > 1)
    # DataLoader decoding workers per process; auto: 0 on a CPU, from the cores on a GPU
    num_workers: Union[Literal["auto"], int] = "auto"  # noqa: UP007
    feature_batch_size: int = 16  # images per extraction batch
    compile: Literal["auto", "always", "never"] = "auto"  # torch.compile the extraction


# Keys that moved to another section: an old `-S train.device=...` names the new key.
MOVED = {f"train.{k}": f"compute.{k}"
         for k in ("device", "nproc", "num_workers", "feature_batch_size", "compile")}


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "food101"


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = "food101-resnet50"
    min_delta: float = 0.0


@dataclass(frozen=True)
class PredictConfig:
    model: str = "champion"  # an alias or a version number
    batch_size: int = 16


@dataclass(frozen=True)
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
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, str(tp)
    )


def _coerce(key: str, value: Any, tp: Any, error: type[Exception] = ConfigError) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats, lists
    become tuples, mappings for a dataclass become that dataclass)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key, error, require_all=True)
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(key, value, option, error)
            except error:
                continue
    elif origin in (list, tuple):
        item_tp = get_args(tp)[0]  # list[X] or tuple[X, ...]
        if isinstance(value, list):
            return tuple(_coerce(f"{key}[{i}]", v, item_tp, error) for i, v in enumerate(value))
    elif origin is dict:
        key_tp, value_tp = get_args(tp)
        if isinstance(value, dict):
            return {_coerce(f"{key}", k, key_tp, error): _coerce(f"{key}.{k}", v, value_tp, error)
                    for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise error(f"{key}: got {value!r}, expected {_describe(tp)}")


def from_mapping(cls: type, raw: Any, name: str, error: type[Exception] = ConfigError,
                 require_all: bool = False) -> Any:
    """Dataclass ``cls`` from the mapping ``raw``, every value checked against its annotation.

    Unknown keys, wrong types and (with ``require_all``) missing keys raise ``error`` with a
    message that starts with the key (``name.key``).
    """
    if raw is None and not require_all:
        raw = {}
    if not isinstance(raw, dict):
        raise error(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        moved = MOVED.get(f"{name}.{unknown[0]}")
        if moved:
            raise error(f"{name}.{unknown[0]}: moved to {moved} (params.yaml section "
                        f"'{moved.split('.')[0]}'); set {moved} instead")
        raise error(
            f"{name}.{unknown[0]}: unknown key; allowed keys in '{name}': {', '.join(known)}"
        )
    if require_all:
        missing = [k for k in known if k not in raw]
        if missing:
            raise error(f"{name}.{missing[0]}: missing")
    values = {k: _coerce(f"{name}.{k}", v, hints[k], error) for k, v in raw.items()}
    return cls(**values)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(p: Params) -> Params:
    """Range checks that types alone cannot express."""
    _check(p.data.image_size >= 16, "data.image_size", "must be >= 16 pixels")
    _check(0 < p.data.test_fraction < 1, "data.test_fraction", "must lie in (0, 1)")
    _check(
        p.data.source == "demo" or bool(p.data.root),
        "data.root",
        f"required for data.source={p.data.source!r}: the folder holding the images",
    )
    # The upper bound (one class per built-in recipe) is checked by the demo generator, at
    # the start of `prepare`: this module does not import it.
    _check(p.demo.classes >= 2, "demo.classes", "must be >= 2")
    _check(p.demo.train_per_class >= 1, "demo.train_per_class", "must be >= 1")
    _check(p.demo.test_per_class >= 1, "demo.test_per_class", "must be >= 1")
    _check(p.demo.min_side >= 32, "demo.min_side", "must be >= 32 pixels")
    _check(p.demo.max_side >= p.demo.min_side, "demo.max_side", "must be >= demo.min_side")
    _check(p.sample.size >= 2, "sample.size", "must be a positive count >= 2")
    _check(p.sample.test_size >= 1, "sample.test_size", "must be a positive count")
    _check(p.sample.unlabeled_size >= 0, "sample.unlabeled_size", "must be >= 0")
    classes = p.sample.classes
    if isinstance(classes, str):
        _check(classes == "all", "sample.classes", "must be 'all', a count >= 2 or a list")
    elif isinstance(classes, int):
        _check(classes >= 2, "sample.classes", "a count of classes must be >= 2")
    else:
        _check(len(classes) >= 2, "sample.classes", "a list needs at least 2 class names")
        _check(len(set(classes)) == len(classes), "sample.classes", "names must be unique")
    _check(0 < p.split.val_fraction < 1, "split.val_fraction", "must lie in (0, 1)")
    _check(p.model.hidden >= 1, "model.hidden", "must be >= 1")
    _check(0 <= p.model.dropout < 1, "model.dropout", "must lie in [0, 1)")
    _check(bool(p.model.weights), "model.weights", "imagenet, none or a path to a state dict")
    _check(p.train.lr > 0, "train.lr", "must be > 0")
    _check(p.train.epochs >= 1, "train.epochs", "must be >= 1")
    _check(p.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(p.train.log_every >= 1, "train.log_every", "must be >= 1")
    _check(p.compute.feature_batch_size >= 1, "compute.feature_batch_size", "must be >= 1")
    _check(p.compute.num_workers == "auto" or p.compute.num_workers >= 0,
           "compute.num_workers", "must be auto or >= 0")
    _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", p.compute.device) is not None,
           "compute.device", "one of auto, cpu, cuda, cuda:N (a GPU index), mps")
    _check(p.compute.nproc == "auto" or p.compute.nproc >= 1, "compute.nproc",
           "must be auto or >= 1")
    if p.compute.nproc != "auto" and p.compute.nproc > 1:  # auto: every GPU, else 1
        _check(p.compute.device != "mps", "compute.nproc",
               "must be 1 with compute.device=mps (DDP runs on CUDA or CPU)")
        _check(":" not in p.compute.device, "compute.nproc",
               f"must be 1 with compute.device={p.compute.device} (one GPU); use "
               "compute.device=cuda to run one process per GPU")
        _check(p.train.batch_size >= p.compute.nproc, "train.batch_size",
               "the global batch must hold at least one image per process (compute.nproc)")
    _check(p.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(bool(p.mlflow.experiment), "mlflow.experiment", "must not be empty")
    _check(bool(p.registry.model_name), "registry.model_name", "must not be empty")
    _check(p.registry.min_delta >= 0, "registry.min_delta", "must be >= 0")
    _check(bool(p.predict.model), "predict.model", "an alias (champion) or a version number")
    _check(p.predict.batch_size >= 1, "predict.batch_size", "must be >= 1")
    return p


def params_from_dict(raw: dict[str, Any] | None) -> Params:
    """Build validated :class:`Params` from a parsed params.yaml mapping."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    sections = {f.name: f.type for f in dataclasses.fields(Params)}
    hints = typing.get_type_hints(Params)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown section; allowed sections: {', '.join(sections)}"
        )
    built = {name: from_mapping(hints[name], raw.get(name), name) for name in sections}
    return validate(Params(**built))


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
