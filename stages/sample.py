"""Stage ``sample``: draw the train sample, the test set and the unlabeled predict inputs.

Inputs: ``data/source/``. Params: ``sample``, ``data.image_size``.
Outputs: ``data/manifests/sample.csv``, ``data/manifests/test.csv``, ``data/unlabeled/``,
``data/manifests/unlabeled_key.csv``, ``reports/sample.json`` (counts, skipped files and why).
"""

from pathlib import Path

from pipeline.config import Params
from pipeline.sampling import draw_sample
from pipeline.sources import load_index
from stages.common import run_stage, write_json

MANIFESTS = Path("data/manifests")


def main(params: Params) -> None:
    root, index, classes = load_index(Path("data/source"))
    result = draw_sample(
        root, index, classes, params.sample, params.data.image_size, Path("data/unlabeled")
    )
    MANIFESTS.mkdir(parents=True, exist_ok=True)
    result.sample.to_csv(MANIFESTS / "sample.csv", index=False)
    result.test.to_csv(MANIFESTS / "test.csv", index=False)
    result.unlabeled_key.to_csv(MANIFESTS / "unlabeled_key.csv", index=False)
    shown = root.relative_to(Path.cwd()) if root.is_relative_to(Path.cwd()) else root
    write_json("reports/sample.json", {"root": str(shown), **result.report})


if __name__ == "__main__":
    run_stage(main)
