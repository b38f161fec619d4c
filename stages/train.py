"""Stage ``train``: transfer learning of the ResNet50 head, tracked in a new MLflow run.

Inputs: ``data/manifests/{train,val}.csv`` (each image's path and sha256),
``reports/sample.json`` (image root, class order). Params: ``model``, ``train``,
``mlflow``, ``data.image_size``.
Outputs: ``reports/run.json`` (the MLflow run id that ``evaluate`` and ``predict`` continue),
``metrics/train.json``, ``plots/train_history.csv`` (one row per epoch) and
``plots/learning_curves.png``.
"""

import subprocess
from pathlib import Path

import pandas as pd
import yaml

from pipeline.config import ConfigError, Params, params_from_dict
from pipeline.jobs import train_and_log
from pipeline.sources import sampled_root
from stages.common import run_stage, write_json


def committed_params() -> dict | None:
    """The flat params of params.yaml at git HEAD: the run name says what differs from it."""
    try:
        text = subprocess.run(
            ["git", "show", "HEAD:params.yaml"], capture_output=True, text=True, check=True
        ).stdout
        return params_from_dict(yaml.safe_load(text)).flat()
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError, ConfigError):
        return None


def main(params: Params) -> None:
    root, classes = sampled_root(Path("reports/sample.json"))
    manifests = {s: Path(f"data/manifests/{s}.csv") for s in ("train", "val")}
    out = train_and_log(params, root, classes, manifests, committed_params(), Path("plots"))
    write_json("reports/run.json", {"run_id": out.run_id, "run_name": out.run_name,
                                    "model_uri": out.model_uri})
    write_json("metrics/train.json", out.metrics)  # the resolved values are MLflow params
    history = pd.DataFrame(out.history).drop(columns="epoch_seconds")  # deterministic file
    history.to_csv("plots/train_history.csv", index=False)


if __name__ == "__main__":
    run_stage(main)
