"""MLflow tracking, as run plumbing: the store, runs, params, metrics, datasets and artifacts.

One of the three modules that import MLflow (with ``registry`` and the model's own
``pipeline.model.pyfunc``). The store is SQLite under the project's own ``mlruns/`` at an
absolute path, also inside ``dvc exp run --temp``; ``MLFLOW_TRACKING_URI`` overrides it (a
team server).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # logs, not a terminal

# MLflow hints that do not apply here: the manifests' class_index never has missing values,
# and the dataset source is a local CSV either way.
for _msg in (
    r".*Inferred schema contains integer column.*",
    r".*dataset source can be interpreted in multiple ways.*",
):
    warnings.filterwarnings("ignore", message=_msg)

import mlflow  # noqa: E402
import yaml  # noqa: E402

from pipeline.config import ConfigError, Params, params_from_dict  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.handoffs import CsvHandoff  # noqa: E402
from pipeline.paths import project_root  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


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


# -- what a new run is called and tagged with --------------------------------------------------


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


def committed_params() -> dict | None:
    """The flat params of params.yaml at git HEAD (the run name says what differs from it)."""
    text = _git("show", "HEAD:params.yaml")
    try:
        return params_from_dict(yaml.safe_load(text)).flat() if text else None
    except (yaml.YAMLError, ConfigError):
        return None


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


@dataclass(frozen=True)
class RunSpec:
    """What a new pipeline run is: experiment, name, tags and every (flattened) param."""

    experiment: str
    name: str
    tags: dict[str, str]
    params: dict


def run_spec(params: Params, stage: str = "train") -> RunSpec:
    """The run of this pipeline execution: named after what differs from the committed
    params, tagged with git state, DVC experiment and the params hash."""
    flat = params.flat()
    tags = {**git_tags(), "params_hash": params.digest(), "stage": stage}
    return RunSpec(params.mlflow.experiment, run_name(describe_changes(flat, committed_params())),
                   tags, flat)


# -- runs --------------------------------------------------------------------------------------


@contextlib.contextmanager
def start_run(spec: RunSpec) -> Iterator[str]:
    """Open a new run; yields its id. Every param is logged; a failure marks the run FAILED."""
    exp_id = ensure_experiment(spec.experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name=spec.name, tags=spec.tags) as run:
        log.info("MLflow run %s (%s) in %s", run.info.run_id, spec.name, tracking_uri())
        log_params(spec.params)
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


def log_manifest(manifest: CsvHandoff, name: str, context: str) -> str:
    """Log a manifest as an MLflow dataset input (its file's sha256 as a tag); returns it."""
    dataset = mlflow.data.from_pandas(manifest.frame, source=manifest.path, name=name,
                                      targets="label")
    mlflow.log_input(dataset, context=context, tags={"sha256": manifest.sha256})
    mlflow.set_tag(f"data.{name}_sha256", manifest.sha256)
    return manifest.sha256


def log_dict(data: dict, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_figure(fig: Figure, artifact_file: str, dpi: int) -> None:
    mlflow.log_figure(fig, artifact_file, save_kwargs={"dpi": dpi})


def download_model(model_uri: str, dst: Path) -> Path:
    """A logged model's folder, downloaded (copied, for a local store) into ``dst``."""
    configure()
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


# -- the UI: links into it, the runs-table view they open, and the descriptions people read ---

# MLflow's own description field of experiments and runs (markdown, shown by the UI).
NOTE = "mlflow.note.content"
# MLflow 3's UI opens in its GenAI mode (traces) unless the URL asks for model training.
UI_MODE = "workflowType=machine_learning"
# A runs-table view stored in the experiment (the UI's own "shared view", an experiment tag):
# the test metrics as the first columns, best first, instead of datasets and sources that
# push every metric off screen.
RUNS_VIEW = "model-training"
VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"
VIEW_METRICS = ("test_accuracy", "test_top5_accuracy", "test_macro_f1", "val_accuracy")
PICTURES = ("training/learning_curves.png", "evaluation/confusion_matrix.png",
            "evaluation/per_class_accuracy.png", "evaluation/worst_predictions.png")


def ui_route(route: str) -> str:
    """``#/<route>?workflowType=machine_learning``: a page of the MLflow UI in model-training
    mode, relative to the server's address (so links in descriptions work on any host)."""
    sep = "&" if "?" in route else "?"
    return f"#/{route.lstrip('/')}{sep}{UI_MODE}"


def runs_route(exp_id: str, view: bool = True) -> str:
    """The experiment's runs table; ``view``: in the stored view (see :data:`RUNS_VIEW`)."""
    route = ui_route(f"experiments/{exp_id}/runs")
    return f"{route}&viewStateShareKey={RUNS_VIEW}" if view else route


def run_route(exp_id: str, run_id: str) -> str:
    return ui_route(f"experiments/{exp_id}/runs/{run_id}")


def model_route(model_name: str) -> str:
    return ui_route(f"models/{quote(model_name, safe='')}")


def version_route(model_name: str, version: str) -> str:
    return ui_route(f"models/{quote(model_name, safe='')}/versions/{version}")


def compare_route(exp_id: str, run_ids: list[str]) -> str:
    return ui_route(f"compare-runs?runs={quote(json.dumps(run_ids))}"
                    f"&experiments={quote(json.dumps([exp_id]))}")


def runs_page(experiment: str) -> str | None:
    """The route of ``experiment``'s runs table (in the stored view when the experiment has
    it), or None when the store has no such experiment yet."""
    configure()
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return runs_route(exp.experiment_id, view=VIEW_TAG in exp.tags)


def runs_view_state() -> dict:
    """The stored runs-table view: sorted by test accuracy, the test metrics first."""
    metrics = [f"metrics.`{m}`" for m in VIEW_METRICS]
    return {"orderByKey": metrics[0], "orderByAsc": False, "selectedColumns": metrics}


def experiment_note(experiment: str, exp_id: str, model_name: str) -> str:
    """The experiment's description: what it is, how to compare runs, where the champion is."""
    pictures = ", ".join(f"`{p}`" for p in PICTURES)
    return (
        f"**{experiment}**: transfer learning of a torchvision ResNet50 on Food-101-style "
        "photos, one run per execution of the DVC pipeline (prepare → sample → split → train "
        "→ evaluate → predict). Each run is named after what differs from the committed "
        "`params.yaml` (`baseline` when nothing does); its description says what differs "
        "and the registry's decision.\n\n"
        f"**Compare runs:** the view [{RUNS_VIEW}]({runs_route(exp_id)}) sorts the table "
        "by `test_accuracy` with the test metrics first; tick two or more runs and press "
        "*Compare* for params, metrics and per-epoch curves side by side. Each run's "
        f"artifacts hold the pictures {pictures}, and the logged model.\n\n"
        f"**Champion:** the registered model [{model_name}]({model_route(model_name)}), "
        f"alias `champion` (load `models:/{model_name}@champion`). Every evaluated run "
        "becomes a version with alias `challenger`; it is promoted when it beats the "
        "champion's test accuracy on the same test manifest. `python -m pipeline versions` "
        "lists them."
    )


def describe_experiment(exp_id: str, model_name: str) -> None:
    """Set the experiment's description and its runs-table view (experiment tags)."""
    configure()
    client = mlflow.MlflowClient()
    note = experiment_note(client.get_experiment(exp_id).name, exp_id, model_name)
    client.set_experiment_tag(exp_id, NOTE, note)
    client.set_experiment_tag(exp_id, VIEW_TAG, json.dumps(runs_view_state()))


def active_experiment_id() -> str:
    """The experiment of the active run."""
    return mlflow.active_run().info.experiment_id


def baseline_diff(current: dict, baseline: dict | None) -> list[tuple[str, object, object]]:
    """``(key, committed value, this run's value)`` for every param that differs from the
    committed params.yaml (a key the baseline lacks has ``None`` there)."""
    if baseline is None:
        return []
    return [(k, baseline.get(k), current[k]) for k in sorted(current)
            if k not in baseline or baseline[k] != current[k]]


def run_note(current: dict, baseline: dict | None, facts: dict[str, object]) -> str:
    """A run's description (markdown): what differs from the committed baseline, then
    ``facts`` (data, resolved values) as a list."""
    git = git_tags()
    if git["git_commit"] == "unknown":
        where = "the committed `params.yaml` (no git repository here)"
    else:
        dirty = ", with uncommitted changes" if git["git_dirty"] == "true" else ""
        where = f"`params.yaml` at git commit `{git['git_commit'][:10]}`{dirty}"
    if baseline is None:
        head = f"**What differs from the baseline:** unknown: {where} could not be read."
    elif diff := baseline_diff(current, baseline):
        rows = "\n".join(f"| `{k}` | {_cell(old)} | **{_cell(new)}** |" for k, old, new in diff)
        head = (f"**What differs from the committed baseline** ({where}):\n\n"
                f"| param | baseline | this run |\n| --- | --- | --- |\n{rows}")
    else:
        head = f"**The committed baseline:** no param differs from {where}."
    if os.environ.get("DVC_EXP_NAME"):
        head += f"\n\nDVC experiment `{os.environ['DVC_EXP_NAME']}`."
    lines = "\n".join(f"- {k}: {v}" for k, v in facts.items())
    return f"{head}\n\n{lines}" if facts else head


def _cell(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text.replace("|", "\\|")


def set_run_note(text: str) -> None:
    """Set the active run's description."""
    mlflow.set_tag(NOTE, text)


def set_run_note_section(heading: str, text: str) -> None:
    """Add the section ``### <heading>`` to the active run's description, or replace it when
    the stage runs again."""
    run = mlflow.active_run()
    note = mlflow.get_run(run.info.run_id).data.tags.get(NOTE, "") if run else ""
    head, *sections = note.split("\n\n### ")
    sections = [s for s in sections if not s.startswith(f"{heading}\n")]
    mlflow.set_tag(NOTE, "\n\n### ".join([head, *sections, f"{heading}\n{text}"]))
