"""The logged model (MLflow "models from code"): raw images in, label, confidence and top-5 out.

MLflow copies this file into the model, beside ``imaging.py`` and ``modeling.py``; weights
and metadata travel as artifacts. A consumer needs none of this repository:

    model = mlflow.pyfunc.load_model("models:/food101-resnet50@champion")
    model.predict(pd.DataFrame({"image": [jpeg_bytes]}))       # or {"path": ["a.jpg"]}
"""

from __future__ import annotations

import json
import warnings

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

try:  # inside the repository
    from pipeline.imaging import load_image
    from pipeline.modeling import (
        build_model,
        eval_transform,
        extract_features,
        inference_backbone,
        prepare_for_inference,
        resolve_precision,
    )
except ModuleNotFoundError:  # inside the logged model: MLflow puts the carried files on sys.path
    from imaging import load_image
    from modeling import (
        build_model,
        eval_transform,
        extract_features,
        inference_backbone,
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


# MLflow suggests type hints on predict() when the class is defined; this model declares an
# explicit signature instead (raw bytes or paths), so that hint is noise for every consumer.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")

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
            model = build_model(meta["arch"], len(self.classes), meta["hidden"], meta["dropout"],
                                feature_norm=meta.get("feature_norm", False))
            state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            self.model = prepare_for_inference(model)
            self.backbone = inference_backbone(self.model.backbone)  # what extraction runs on
            self.transform = eval_transform(self.image_size)

        @torch.inference_mode()
        def log_probs(self, sources: list) -> torch.Tensor:
            """[N,C] log-probabilities for bytes or paths (the pipeline's own forward pass)."""
            outs = []
            for i in range(0, len(sources), self.batch_size):
                batch = torch.stack(
                    [
                        self.transform(load_image(s, min_side=self.image_size))
                        for s in sources[i : i + self.batch_size]
                    ]
                )
                feats = extract_features(self.backbone, batch, self.precision)
                outs.append(self.model.head(feats))
            return torch.cat(outs) if outs else torch.zeros((0, len(self.classes)))

        def predict(self, context, model_input, params=None) -> pd.DataFrame:
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
