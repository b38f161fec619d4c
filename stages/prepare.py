"""Stage ``prepare``: materialise the data source.

Params: ``data``, ``demo``. Output: ``data/source/`` (``index.csv`` listing every image with its
class and official train/test list, ``source.json``; for ``data.source=demo`` also the
generated Food-101-layout photos).
"""

from pathlib import Path

from pipeline.config import Params
from pipeline.sources import materialise
from stages.common import run_stage

OUT = Path("data/source")


def main(params: Params) -> None:
    materialise(params.data, params.demo, OUT)


if __name__ == "__main__":
    run_stage(main)
