"""Stage ``split``: stratified, seeded train/validation split of the sample.

Input: ``data/manifests/sample.csv``. Params: ``split``.
Outputs: ``data/manifests/train.csv``, ``data/manifests/val.csv``.
"""

from pipeline import handoffs
from pipeline.config import Params
from pipeline.data.sampling import split_sample
from stages.common import run_stage


def main(params: Params) -> None:
    sample = handoffs.Manifest.read(handoffs.SAMPLE_MANIFEST)
    train, val = split_sample(sample.frame, params.split)
    handoffs.Manifest(train).write(handoffs.TRAIN_MANIFEST)
    handoffs.Manifest(val).write(handoffs.VAL_MANIFEST)


if __name__ == "__main__":
    run_stage(main)
