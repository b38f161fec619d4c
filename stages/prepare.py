"""Stage ``prepare``: materialise the data source.

Params: ``data``, ``demo``, ``sample``. Outputs: ``data/source/`` (``index.csv`` listing every
image with its class and official train/test list, ``source.json``; for ``data.source=demo``
also the generated Food-101-layout photos: those ``sample`` draws with these ``sample``
settings, the meta lists naming them all); ``reports/prepare.json`` (what was written, and
for which draw).
"""

import dataclasses

from pipeline import handoffs
from pipeline.config import Params
from pipeline.data.sources import materialise
from stages.common import run_stage


def main(params: Params) -> None:
    # The demo writes only the images `sample` will draw: prepare depends on `sample` too.
    info, index = materialise(params.data, params.demo, handoffs.SOURCE_DIR, params.sample)
    index.write(handoffs.SOURCE_INDEX)
    info.write(handoffs.SOURCE_INFO)
    demo = params.data.source == "demo"
    handoffs.write_json(handoffs.PREPARE_REPORT, {
        "source": params.data.source,
        "images_listed": len(index.frame),
        "photos_written": (sum(1 for _ in (handoffs.SOURCE_DIR / "images").rglob("*.jpg"))
                           if demo else 0),
        # the draw the demo photos are those of (sample's parameters when prepare ran)
        "demo_photos_for_sample": dataclasses.asdict(params.sample) if demo else None,
    })


if __name__ == "__main__":
    run_stage(main)
