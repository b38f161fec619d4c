"""Stage ``champion`` (always runs, in seconds): which registry version ``predict.model``
names right now.

Input: ``reports/promotion.json`` (so it runs after ``evaluate``). Params:
``registry.model_name``, ``predict.model``. Output: ``reports/champion.json`` (version and
run). ``predict`` depends on it: a champion moved anywhere (``promote``, ``rollback``, another
machine, the MLflow UI) makes ``predict`` re-run; an unchanged one rewrites the same bytes.
"""

from pipeline.config import Params
from pipeline.handoffs import RunRef
from pipeline.runs.registry import resolve
from pipeline.runs.tracking import check_run_here
from stages.common import run_stage


def main(params: Params) -> None:
    # Results pulled from a DVC remote into a clone with another store: say which store has
    # them and the two ways out, rather than "no such model" (which re-running never fixes).
    check_run_here(RunRef.read())
    resolve(params.registry.model_name, params.predict.model).champion_file().write()


if __name__ == "__main__":
    run_stage(main)
