"""Stage ``evaluate``: test metrics of the run's model, registry version and promotion gate.

Inputs: ``reports/run.json``, ``data/manifests/test.csv`` (paths and sha256),
``reports/sample.json`` (image root, class order).
Params: ``registry``. Outputs: ``metrics/evaluate.json``, ``reports/promotion.json``,
``reports/per_class.csv``, ``plots/confusion.csv`` (dvc plots, confusion template),
``plots/confusion_matrix.png``. All of it also goes to the MLflow run that ``train`` opened.
"""

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.jobs import evaluate_and_log
from pipeline.sources import sampled_root
from stages.common import run_stage, write_json


def main(params: Params) -> None:
    root, classes = sampled_root(Path("reports/sample.json"))
    run = json.loads(Path("reports/run.json").read_text())
    out = evaluate_and_log(params, root, classes, Path("data/manifests/test.csv"), run,
                           Path("plots"))
    write_json("metrics/evaluate.json", out.metrics)
    write_json("reports/promotion.json", out.decision)
    out.per_class.to_csv("reports/per_class.csv", index=False)
    out.confusion.to_csv("plots/confusion.csv", index=False)


if __name__ == "__main__":
    run_stage(main)
