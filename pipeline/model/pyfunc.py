"""The logged model as MLflow sees it: raw images in, label, confidence and top-5 out (and an
``error`` per row: an unreadable image gets a message and no label; the others are labelled).

MLflow loads this file as the model ("models from code"); the package it imports travels with
the model under its own name (``code/pipeline/__init__.py`` + ``code/pipeline/model/``), so a
loaded model runs the code it was logged with, never a newer copy of this repository. Weights
and the :class:`ModelCard` travel as artifacts. A consumer needs none of this repository:

    model = mlflow.pyfunc.load_model("models:/food101-resnet50@champion")
    model.predict(pd.DataFrame({"image": [jpeg_bytes]}))       # or {"path": ["a.jpg"]}
    model.predict(frame, params={"batch_size": 64})             # inference batch size

The device and the inference precision are resolved when the model is loaded, on the machine
that loads it: a GPU when there is one, else the CPU (weights are loaded with
``map_location="cpu"``, so a model trained on a GPU loads anywhere), and the precision that
device supports (``devices.inference_precision``), not the one training used.
``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`` picks a device.

Of the model package, only this module imports MLflow.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from pipeline.model.card import ModelCard
from pipeline.model.errors import ModelCardError
from pipeline.model.inference import load_classifier
from pipeline.model.network import FoodNet

TOP_K = 5
DEFAULT_BATCH_SIZE = 16
WEIGHTS = "weights"  # artifact keys; the files are weights.pt and card.json
CARD = "card"
PACKAGE = Path(__file__).resolve().parent  # pipeline/model/


def _sources(df: pd.DataFrame) -> list:
    """Per row: the bytes in ``image`` when present, else the file path in ``path``, else
    None (that row gets an error)."""
    images = df["image"] if "image" in df else pd.Series([None] * len(df), index=df.index)
    paths = df["path"] if "path" in df else pd.Series([None] * len(df), index=df.index)
    out = []
    for img, path in zip(images, paths, strict=True):
        if isinstance(img, (bytes, bytearray)) and len(img):
            out.append(bytes(img))
        elif isinstance(img, str) and img:
            out.append(img)  # a path given in the image column
        elif isinstance(path, str) and path:
            out.append(path)
        else:
            out.append(None)
    return out


class FoodClassifier(PythonModel):
    """The trained network with its preprocessing and class names inside."""

    def load_context(self, context) -> None:
        self.card = ModelCard.read(Path(context.artifacts[CARD]))
        state = torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True)
        device = (getattr(context, "model_config", None) or {}).get("device", "auto")
        self.classifier = load_classifier(self.card, state, device)

    # Type hints: MLflow infers no schema from a DataFrame hint (the signature is explicit),
    # and without hints it warns on every definition of the class.
    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        log_probs, errors = self.classifier.log_probs_or_errors(_sources(df), batch_size)
        probs = log_probs.exp().numpy()
        classes = self.card.classes
        k = min(TOP_K, len(classes))
        rows = []
        for i, error in enumerate(errors):
            if error is not None:
                rows.append((None, None, None, error))
                continue
            top = np.argsort(-probs[i])[:k]
            rows.append((classes[top[0]], float(probs[i, top[0]]),
                         json.dumps([[classes[j], round(float(probs[i, j]), 6)] for j in top]),
                         None))
        # object columns: an unreadable row is null (JSON null), not NaN
        return pd.DataFrame(rows, columns=["label", "confidence", "top5", "error"],
                            dtype=object)


def signature() -> ModelSignature:
    """Input: image bytes (``image``) or a file path (``path``); output: label, confidence,
    top5; param: the inference ``batch_size`` (a load-time setting, not part of training)."""
    return ModelSignature(
        inputs=Schema(
            [ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)]
        ),
        outputs=Schema(
            [ColSpec("string", "label", required=False),
             ColSpec("double", "confidence", required=False),
             ColSpec("string", "top5", required=False),
             ColSpec("string", "error", required=False)]
        ),
        params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]),
    )


def requirements() -> list[str]:
    """Pinned to this environment. Explicit: inferring them costs seconds per run and can miss
    torchvision."""
    return [f"{p}=={version(p)}"
            for p in ("mlflow", "torch", "torchvision", "pillow", "numpy", "pandas")]


def log_model(net: FoodNet, card: ModelCard, example_images: list[bytes],
              name: str = "model") -> str:
    """Log the self-contained model (this package, weights, card) in the active MLflow run;
    returns its URI."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights.pt"
        torch.save(net.state_dict(), weights)
        card_file = card.write(tmp / "card.json")
        # MLflow copies each code path by its folder name into the model's code/ and puts
        # code/ first on sys.path: a folder named pipeline holding __init__.py and model/.
        package = tmp / "pipeline"
        package.mkdir()
        shutil.copy(PACKAGE.parent / "__init__.py", package / "__init__.py")
        shutil.copytree(PACKAGE, package / "model",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PACKAGE / "pyfunc.py"),
            code_paths=[str(package)],
            artifacts={WEIGHTS: str(weights), CARD: str(card_file)},
            signature=signature(),
            # load_model(uri, model_config={"device": "cpu"}) picks another device
            model_config={"device": "auto"},
            input_example=pd.DataFrame({"image": example_images}),
            pip_requirements=requirements(),
        )
    return info.model_uri


def load_network(model_dir: Path) -> tuple[FoodNet, ModelCard]:
    """The network and card of a model logged by :func:`log_model`, from its local folder
    (what ``mlflow.artifacts.download_artifacts`` of the model URI returns)."""
    card, state = load_trained(model_dir)
    return card.build_network(state), card


def load_trained(model_dir: Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """The card and state dict of a model logged by :func:`log_model`, from its local
    folder (no network built: :func:`pipeline.features.scoring.score_manifest` builds only
    what it needs)."""
    model_dir = Path(model_dir)
    flavor = mlflow.models.Model.load(model_dir).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts", {})
    if CARD not in artifacts or WEIGHTS not in artifacts:
        raise ModelCardError(
            f"{model_dir}: the model has no {CARD}.json (logged by an older version of the "
            "pipeline); it can still be loaded and run with mlflow.pyfunc.load_model"
        )
    card = ModelCard.read(model_dir / artifacts[CARD]["path"])
    state = torch.load(model_dir / artifacts[WEIGHTS]["path"], map_location="cpu",
                       weights_only=True)
    return card, state


mlflow.models.set_model(FoodClassifier())
