"""The model card: what a logged model is, written once at train time and read back whole.

Stored as ``card.json`` beside the weights inside every logged model. Reading checks every
field, so a card of another format is refused with a clear message instead of being
half-understood.

The check is hand-written, not pydantic (which checks ``params.yaml`` and the hand-off files),
on purpose: this module is shipped inside every logged model and runs in the consumer's
environment, whose packages are the model's declared requirements (mlflow, torch, torchvision,
pillow, numpy, pandas); pydantic is there only as one of mlflow's own dependencies, which a
later mlflow may change. ``HeadSpec`` and ``Preprocessing`` are plain dataclasses of this
package, and the card's messages (missing or unknown fields, a scalar of the wrong type) are
pinned by ``tests/model/test_card.py``: forty lines of checks cost less than a dependency
every model would carry undeclared.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from pipeline.model.errors import ModelCardError
from pipeline.model.network import FoodNet, Head, HeadSpec, build_model, feature_dim
from pipeline.model.presets import Preprocessing

CARD_FORMAT = 1


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to rebuild and run a trained model, besides its weights."""

    arch: str
    classes: tuple[str, ...]
    image_size: int
    head: HeadSpec
    weights: str  # what the backbone started from, e.g. "none (random init, seed 0)"
    # What training and feature extraction resolved to ("fp32", "bf16" or "fp16"). A loaded
    # model runs in fp32 when this is fp32, else at its own device's reduced precision.
    precision: str
    preprocessing: Preprocessing
    run_id: str  # the MLflow run that trained it
    format: int = CARD_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "card.json") -> ModelCard:
        """Parse and check a card; :class:`ModelCardError` names the file and what is wrong."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelCardError(f"{source}: not JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ModelCardError(f"{source}: expected a JSON object")
        if raw.get("format") != CARD_FORMAT:
            raise ModelCardError(
                f"{source}: card format {raw.get('format')!r}, this code reads format "
                f"{CARD_FORMAT}; load the model with the code it carries (mlflow.pyfunc)"
            )
        try:
            return cls(
                **{
                    **_exact(raw, cls, source),
                    "classes": tuple(str(c) for c in raw["classes"]),
                    "head": HeadSpec(**_exact(raw["head"], HeadSpec, f"{source}: head")),
                    "preprocessing": _preprocessing(raw["preprocessing"], source),
                }
            )
        except (TypeError, ValueError) as exc:
            raise ModelCardError(f"{source}: {exc}") from exc

    def write(self, path: Path) -> Path:
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        return cls.from_json(Path(path).read_text(), source=str(path))

    def build_network(self, state: dict[str, torch.Tensor]) -> FoodNet:
        """The trained network from its state dict (strict: every key must fit this card)."""
        # Built on the meta device, then given the logged tensors: no random init to throw
        # away, and strict loading still names any missing or unexpected key.
        with torch.device("meta"):
            net = build_model(self.arch, self.num_classes, self.head)
        net.load_state_dict(state, assign=True)
        return net.eval()

    def build_head(self, state: dict[str, torch.Tensor]) -> Head:
        """The trained head alone, from the whole network's state dict (strict on the
        ``head.`` keys): what scoring cached features needs, without building a backbone."""
        with torch.device("meta"):
            head = Head(feature_dim(self.arch), self.num_classes, self.head)
        head.load_state_dict({k[len("head."):]: v for k, v in state.items()
                              if k.startswith("head.")}, assign=True)
        return head.eval()


_SCALARS = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _exact(raw: object, cls: type, source: str) -> dict:
    """``raw`` as a dict holding exactly the fields of dataclass ``cls``, scalars type-checked."""
    if not isinstance(raw, dict):
        raise ModelCardError(f"{source}: expected a JSON object, got {raw!r}")
    names = {f.name for f in fields(cls)}  # a card lists every field, defaults included
    missing, unknown = sorted(names - set(raw)), sorted(set(raw) - names)
    if missing or unknown:
        raise ModelCardError(f"{source}: missing fields {missing}, unknown fields {unknown}")
    for name, tp in typing.get_type_hints(cls).items():
        ok = _SCALARS.get(tp)
        value = raw.get(name)
        if ok and name in raw and (not isinstance(value, ok) or
                                   (tp is not bool and isinstance(value, bool))):
            raise ModelCardError(f"{source}: {name}={value!r} is not of type {tp.__name__}")
    return dict(raw)


def _preprocessing(raw: object, source: str) -> Preprocessing:
    values = _exact(raw, Preprocessing, f"{source}: preprocessing")
    for key in ("mean", "std"):
        if key in values:
            values[key] = tuple(float(v) for v in values[key])
    return Preprocessing(**values)
