"""The logged model (MLflow "models from code"): raw images in, label, confidence and top-5 out.

MLflow copies this file into the model, beside ``imaging.py`` and ``modeling.py``; weights
and metadata travel as artifacts. A consumer needs none of this repository:

    model = mlflow.pyfunc.load_model("models:/food101-resnet50@champion")
    model.predict(pd.DataFrame({"image": [jpeg_bytes]}))       # or {"path": ["a.jpg"]}
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

try:  # inside the repository
    from pipeline.imaging import load_image
    from pipeline.modeling import (
        build_model,
        eval_pixels,
        eval_resize_crop,
        extract_features,
        inference_backbone,
        normalize_batch,
        prepare_for_inference,
        resolve_precision,
    )
except ModuleNotFoundError:  # inside the logged model: MLflow puts the carried files on sys.path
    from imaging import load_image
    from modeling import (
        build_model,
        eval_pixels,
        eval_resize_crop,
        extract_features,
        inference_backbone,
        normalize_batch,
        prepare_for_inference,
        resolve_precision,
    )

TOP_K = 5


def _sources(df: pd.DataFrame) -> list:
    """Per row: the bytes in ``image`` when present, else the file path in ``path``."""
    images = df["image"] if "image" in df else pd.Series([None] * len(df), index=df.index)
    paths = df["path"] if "path" in df else pd.Series([None] * len(df), index=df.index)
    out = []
    for i, (img, path) in enumerate(zip(images, paths, strict=True)):
        if isinstance(img, (bytes, bytearray)) and len(img):
            out.append(bytes(img))
        elif isinstance(img, str) and img:
            out.append(img)  # a path given in the image column
        elif isinstance(path, str) and path:
            out.append(path)
        else:
            raise ValueError(f"row {i}: give image bytes in column 'image' or a file in 'path'")
    return out


class FoodClassifier(PythonModel):
    """ResNet50 + head with its preprocessing and class names inside."""

    def load_context(self, context) -> None:
        with open(context.artifacts["meta"]) as fh:
            meta = json.load(fh)
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.image_size: int = meta["image_size"]
        self.precision = resolve_precision(meta.get("precision", "auto"))
        self.batch_size = int(meta.get("batch_size", 32))
        # Built on the meta device, then given the logged tensors: no random init to
        # throw away (and strict loading still names any missing or unexpected key).
        with torch.device("meta"):
            model = build_model(meta["arch"], len(self.classes), meta["hidden"],
                                meta["dropout"], feature_norm=meta.get("feature_norm", False))
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        model.load_state_dict(state, assign=True)
        self.model = prepare_for_inference(model)
        self.resize_crop = eval_resize_crop(self.image_size)
        self._backbone = None

    @property
    def backbone(self):
        """What extraction runs on, built on first use (the pipeline's evaluation reads
        cached features and never needs it)."""
        if self._backbone is None:
            self._backbone = inference_backbone(self.model.backbone)
        return self._backbone

    @torch.inference_mode()
    def log_probs(self, sources: list) -> torch.Tensor:
        """[N,C] log-probabilities for bytes or paths (the pipeline's own forward pass)."""
        outs = []
        for i in range(0, len(sources), self.batch_size):
            pixels = np.stack(
                [
                    eval_pixels(load_image(s, min_side=self.image_size), self.image_size,
                                self.resize_crop)
                    for s in sources[i : i + self.batch_size]
                ]
            )
            feats = extract_features(self.backbone, normalize_batch(pixels), self.precision)
            outs.append(self.model.head(feats))
        return torch.cat(outs) if outs else torch.zeros((0, len(self.classes)))

    # A DataFrame type hint (MLflow infers no schema from it: the signature is explicit)
    # keeps MLflow from warning, on every definition, that predict() has no type hints.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        probs = self.log_probs(_sources(df)).exp().numpy()
        k = min(TOP_K, len(self.classes))
        top = np.argsort(-probs, axis=1)[:, :k]
        return pd.DataFrame(
            {
                "label": [self.classes[row[0]] for row in top],
                "confidence": [float(probs[i, row[0]]) for i, row in enumerate(top)],
                "top5": [
                    json.dumps([[self.classes[j], round(float(probs[i, j]), 6)] for j in row])
                    for i, row in enumerate(top)
                ],
            }
        )


mlflow.models.set_model(FoodClassifier())
