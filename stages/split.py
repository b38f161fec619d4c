"""Stage ``split``: stratified, seeded train/validation split of the sample.

Input: ``data/manifests/sample.csv``. Params: ``split``.
Outputs: ``data/manifests/train.csv``, ``data/manifests/val.csv``.
"""

from pathlib import Path

import pandas as pd

from pipeline.config import Params
from pipeline.sampling import split_sample
from stages.common import run_stage

MANIFESTS = Path("data/manifests")


def main(params: Params) -> None:
    sample = pd.read_csv(MANIFESTS / "sample.csv", dtype={"path": str, "label": str,
                                                          "sha256": str})
    train, val = split_sample(sample, params.split)
    train.to_csv(MANIFESTS / "train.csv", index=False)
    val.to_csv(MANIFESTS / "val.csv", index=False)


if __name__ == "__main__":
    run_stage(main)
