"""Stage ``sample``: draw the train sample, the test set and the unlabeled predict inputs.

Inputs: ``data/source/``. Params: ``sample``, ``data.image_size``.
Outputs: ``data/manifests/sample.csv``, ``data/manifests/test.csv``, ``data/unlabeled/``,
``data/manifests/unlabeled_key.csv``, ``reports/sample.json`` (counts, skipped files and why).
"""

import dataclasses
from pathlib import Path

from pipeline import handoffs
from pipeline.config import Params
from pipeline.data.sampling import check_demo_draw, draw_sample
from stages.common import run_stage


def main(params: Params) -> None:
    info = handoffs.SourceInfo.read()
    root = info.image_root()
    index = handoffs.SourceIndex.read(handoffs.SOURCE_INDEX)
    if info.source == "demo":  # it holds only the photos of the draw prepare was run for
        check_demo_draw(root, index.frame, list(info.classes), params.sample)
    result = draw_sample(root, index.frame, list(info.classes), params.sample,
                         params.data.image_size)
    result.sample.write(handoffs.SAMPLE_MANIFEST)
    result.test.write(handoffs.TEST_MANIFEST)
    result.unlabeled_key.write(handoffs.UNLABELED_KEY)
    handoffs.write_unlabeled(result.unlabeled_key, root)
    # The root as later stages find it: relative inside the workspace (DVC experiments run
    # in other folders), absolute outside it.
    shown = root.relative_to(Path.cwd()) if root.is_relative_to(Path.cwd()) else root
    dataclasses.replace(result.report, root=str(shown)).write()


if __name__ == "__main__":
    run_stage(main)
