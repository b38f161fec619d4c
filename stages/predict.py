"""Stage ``predict``: label the unlabeled images with the registry's champion.

Inputs: ``data/unlabeled/``, ``data/manifests/unlabeled_key.csv`` (used only to score),
``reports/run.json``, ``reports/champion.json`` (a dependency: a moved champion re-runs it).
Params: ``predict``, ``registry.model_name``.
Outputs: ``predictions/predictions.csv`` (file, label, confidence, top5),
``metrics/predict.json`` (``accuracy`` against the answer key).
"""

from pipeline import handoffs
from pipeline.config import Params
from pipeline.jobs.predict import predict_and_log
from stages.common import run_stage


def main(params: Params) -> None:
    preds, metrics = predict_and_log(
        handoffs.unlabeled_files(), handoffs.UnlabeledKey.read(handoffs.UNLABELED_KEY),
        params.registry, params.predict, handoffs.RunRef.read(),
    )
    handoffs.write_csv(handoffs.PREDICTIONS, preds)
    handoffs.write_json(handoffs.PREDICT_METRICS, metrics)


if __name__ == "__main__":
    run_stage(main)
