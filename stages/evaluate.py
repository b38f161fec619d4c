"""Stage ``evaluate``: test metrics of the run's model, registry version and promotion gate.

Inputs: ``reports/run.json``, ``data/manifests/test.csv`` (paths and sha256),
``reports/sample.json`` (image root, class order).
Params: ``registry``, ``compute.device``, ``compute.feature_batch_size``,
``compute.num_workers``.
Outputs: ``metrics/evaluate.json``, ``reports/promotion.json``, ``reports/per_class.csv``,
``plots/confusion.csv`` (dvc plots, confusion template), ``plots/per_class_accuracy.csv``
(sorted bars), and the pictures ``plots/{confusion_matrix,per_class_accuracy,
worst_predictions}.png``. All of it also goes to the MLflow run that ``train`` opened.
"""

from pipeline import handoffs
from pipeline.config import Params
from pipeline.jobs.evaluate import TestData, evaluate_and_log
from pipeline.paths import feature_cache_dir
from stages.common import run_stage


def main(params: Params) -> None:
    report = handoffs.SampleReport.read()
    data = TestData(report.image_root(), report.classes,
                    handoffs.Manifest.read(handoffs.TEST_MANIFEST))
    out = evaluate_and_log(data, handoffs.RunRef.read(), params.registry, params.compute,
                           feature_cache_dir())
    handoffs.write_json(handoffs.EVALUATE_METRICS, out.metrics)
    out.decision.write()
    handoffs.write_csv(handoffs.PER_CLASS_REPORT, out.per_class)
    handoffs.write_csv(handoffs.CONFUSION_CSV, out.confusion)
    handoffs.write_csv(handoffs.PER_CLASS_ACCURACY_CSV, out.accuracy)
    handoffs.atomic_write_bytes(handoffs.CONFUSION_PNG, out.pngs["confusion_matrix"])
    handoffs.atomic_write_bytes(handoffs.PER_CLASS_ACCURACY_PNG, out.pngs["per_class_accuracy"])
    handoffs.atomic_write_bytes(handoffs.WORST_PREDICTIONS_PNG, out.pngs["worst_predictions"])


if __name__ == "__main__":
    run_stage(main, torch_threads=True)
