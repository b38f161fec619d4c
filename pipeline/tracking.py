"""MLflow tracking: the store, runs, params, metrics, datasets and the logged model.

One of the two modules that touch MLflow (the other is ``registry``). The store is SQLite
under the project's own ``mlruns/`` at an absolute path, also inside ``dvc exp run --temp``;
``MLFLOW_TRACKING_URI`` overrides it (a team server).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

# MLflow hints that do not apply here: the manifests' class_index never has missing values,
# and the dataset source is a local CSV either way.
for _msg in (
    r".*Inferred schema contains integer column.*",
    r".*dataset source can be interpreted in multiple ways.*",
):
    warnings.filterwarnings("ignore", message=_msg)

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types import ColSpec, Schema  # noqa: E402

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.paths import project_root  # noqa: E402

log = logging.getLogger(__name__)

PIPELINE_DIR = Path(__file__).resolve().parent
MODEL_NAME_IN_RUN = "model"


class TrackingError(PipelineError):
    """The MLflow store or run is not where the pipeline expects it."""


def store_dir() -> Path:
    """The project's own MLflow folder (``<root>/mlruns``)."""
    return project_root() / "mlruns"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs root>/mlruns/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow (tracking and registry) at the store; return its URI."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it (artifacts under ``mlruns/artifacts``) when missing."""
    configure()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):
        location = (Path(tracking_uri().removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another run
        return mlflow.get_experiment_by_name(name).experiment_id


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_tags() -> dict[str, str]:
    """Commit and dirty flag of the working tree (inside a DVC experiment: its baseline)."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "git_commit": commit,
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "mlflow.source.git.commit": commit,
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def describe_changes(current: dict, baseline: dict | None) -> str:
    """``lr=0.001 epochs=3``: the params that differ from the committed params.yaml."""
    if not baseline:
        return ""
    changed = [k for k in sorted(current) if k in baseline and current[k] != baseline[k]]
    changed += [k for k in sorted(current) if k not in baseline]
    short = {}
    for key in changed:
        leaf = key.split(".")[-1]
        clash = sum(1 for k in current if k.split(".")[-1] == leaf) > 1
        short[key if clash else leaf] = current[key]
    return " ".join(f"{k}={v}" for k, v in short.items())


def run_name(changes: str) -> str:
    """``<dvc exp name>: <changes>``, or ``baseline``."""
    prefix = os.environ.get("DVC_EXP_NAME", "")
    text = changes or "baseline"
    return f"{prefix}: {text}" if prefix else text


@contextlib.contextmanager
def start_run(experiment: str, name: str, tags: dict[str, str]) -> Iterator[str]:
    """Open a new run in ``experiment``; yields its id. A failure marks the run FAILED."""
    exp_id = ensure_experiment(experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags) as run:
        log.info("MLflow run %s (%s) in %s", run.info.run_id, name, tracking_uri())
        yield run.info.run_id


@contextlib.contextmanager
def resume_run(run_id: str) -> Iterator[str]:
    """Re-open the run that ``train`` started (``evaluate`` and ``predict`` add to it)."""
    configure()
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(
            f"MLflow run {run_id} (from reports/run.json) is not in {tracking_uri()}: was "
            "mlruns/ deleted or MLFLOW_TRACKING_URI changed? Re-run `dvc repro -f train`."
        ) from exc
    with mlflow.start_run(run_id=run_id):
        yield run_id


def log_params(params: dict) -> None:
    """Log a flat ``key -> value`` dict (lists as JSON, None as 'null')."""
    clean = {
        k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else ("null" if v is None else v)
        for k, v in params.items()
    }
    mlflow.log_params(clean)


def log_metrics(metrics: dict, step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_metric(key: str, value: float, step: int | None = None) -> None:
    mlflow.log_metric(key, float(value), step=step)


def set_tags(tags: dict) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def log_manifest(path: Path, name: str, context: str) -> str:
    """Log a manifest CSV as an MLflow dataset input; returns the file's sha256."""
    df = pd.read_csv(path)
    digest = file_sha256(path)
    dataset = mlflow.data.from_pandas(df, source=str(path), name=name, targets="label")
    mlflow.log_input(dataset, context=context, tags={"sha256": digest})
    mlflow.set_tag(f"data.{name}_sha256", digest)
    return digest


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def log_dict(data: dict, name: str) -> None:
    mlflow.log_dict(data, name)


def _requirements() -> list[str]:
    from importlib.metadata import version

    # Explicit: inferring them costs seconds per run and can miss torchvision.
    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "torchvision", "pillow")] + [
        f"numpy=={version('numpy')}", f"pandas=={version('pandas')}",
    ]


def model_signature() -> ModelSignature:
    """Input: image bytes (``image``) or a file path (``path``); output: label, confidence, top5."""
    return ModelSignature(
        inputs=Schema(
            [ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)]
        ),
        outputs=Schema(
            [ColSpec("string", "label"), ColSpec("double", "confidence"), ColSpec("string", "top5")]
        ),
    )


def log_model(model: torch.nn.Module, meta: dict, example_images: list[bytes]) -> str:
    """Log the self-contained pyfunc (code, weights, metadata) in the active run; its URI."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), weights)
        meta_file = Path(tmp) / "meta.json"
        meta_file.write_text(json.dumps(meta, indent=2))
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PIPELINE_DIR / "serving.py"),
            code_paths=[str(PIPELINE_DIR / "imaging.py"), str(PIPELINE_DIR / "modeling.py")],
            artifacts={"weights": str(weights), "meta": str(meta_file)},
            signature=model_signature(),
            input_example=pd.DataFrame({"image": example_images}),
            pip_requirements=_requirements(),
        )
    return info.model_uri


def load_pyfunc(model_uri: str):
    """Load a logged or registered model as a pyfunc.

    Without MLflow's check of the model's pip requirements against this environment: it
    scans every installed distribution (~1 s per load), and the pipeline loads only models
    it logged itself, from this same environment.
    """
    configure()
    return mlflow.pyfunc.load_model(model_uri, suppress_warnings=True)
