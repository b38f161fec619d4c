"""Stage ``predict``: label the unlabeled images with the registry's champion.

Inputs: ``data/unlabeled/``, ``data/manifests/unlabeled_key.csv`` (used only to score),
``reports/run.json``, ``reports/promotion.json``. Params: ``predict``, ``registry.model_name``.
Outputs: ``predictions/predictions.csv`` (file, label, confidence, top5),
``metrics/predict.json`` (``accuracy`` against the answer key).
"""

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.jobs import predict_and_log
from stages.common import run_stage, write_json


def main(params: Params) -> None:
    run = json.loads(Path("reports/run.json").read_text())
    preds, metrics = predict_and_log(
        params, Path("data/unlabeled"), Path("data/manifests/unlabeled_key.csv"), run
    )
    Path("predictions").mkdir(exist_ok=True)
    preds.to_csv("predictions/predictions.csv", index=False)
    write_json("metrics/predict.json", metrics)


if __name__ == "__main__":
    run_stage(main)
