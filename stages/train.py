"""Stage ``train``: transfer learning of the ResNet50 head, tracked in a new MLflow run.

Inputs: ``data/manifests/{train,val}.csv`` (each image's path and sha256),
``reports/sample.json`` (image root, class order). Params: ``model``, ``train``, ``compute``,
``mlflow``, ``data.image_size``.
Outputs: ``reports/run.json`` (the MLflow run id that ``evaluate`` and ``predict`` continue),
``metrics/train.json``, ``plots/train_history.csv`` (one row per epoch) and
``plots/learning_curves.png``. With ``compute.nproc`` > 1 the stage runs itself again as that
many ranks under torchrun (as several machines run it); rank 0 writes the outputs.
"""

from pipeline import distributed, handoffs
from pipeline.compute import resolve_compute
from pipeline.config import Params
from pipeline.jobs.train import TrainData, TrainRun, train_and_log
from pipeline.paths import feature_cache_dir
from stages.common import run_stage


def main(params: Params) -> None:
    compute = resolve_compute(params.compute, params.train.precision)
    if compute.needs_launch:
        return distributed.torchrun(compute, ["-m", "stages.train"])
    report = handoffs.SampleReport.read()
    data = TrainData(report.image_root(), report.classes,
                     handoffs.Manifest.read(handoffs.TRAIN_MANIFEST),
                     handoffs.Manifest.read(handoffs.VAL_MANIFEST))
    out = train_and_log(TrainRun.from_params(params, data, feature_cache_dir(), compute=compute))
    if out is None:  # a rank other than 0: rank 0 writes
        return
    out.run.write()
    handoffs.write_json(handoffs.TRAIN_METRICS, out.metrics)  # resolved values: MLflow params
    handoffs.write_csv(handoffs.TRAIN_HISTORY, out.history)
    handoffs.atomic_write_bytes(handoffs.LEARNING_CURVES, out.curves_png)


if __name__ == "__main__":
    run_stage(main, torch_threads=True)
