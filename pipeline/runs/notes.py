"""What people read in the MLflow UI: links into it (model-training mode), the runs-table view
they open, and the descriptions of the experiment, a run, a registered model and a version.

Text only: these functions take values and return strings or dicts; ``tracking`` and
``registry`` write them to the store. Change what the UI shows first here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from pipeline.handoffs import Promotion

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
# The registry's aliases: names people read and load (``registry`` sets them).
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"

# (param, its committed value, this run's value): what a run changed
Change = tuple[str, object, object]


# -- links -------------------------------------------------------------------------------------


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


def runs_view_state() -> dict:
    """The stored runs-table view: sorted by test accuracy, the test metrics first."""
    metrics = [f"metrics.`{m}`" for m in VIEW_METRICS]
    return {"orderByKey": metrics[0], "orderByAsc": False, "selectedColumns": metrics}


# -- the experiment and a run ----------------------------------------------------------------


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
        f"alias `{CHAMPION}` (load `models:/{model_name}@{CHAMPION}`). Every evaluated run "
        f"becomes a version with alias `{CHALLENGER}`; it is promoted when it beats the "
        "champion's test accuracy on the same test manifest. `python -m pipeline versions` "
        "lists them."
    )


def run_note(changes: Sequence[Change] | None, commit: str | None, dirty: bool | None,
             facts: dict[str, object], dvc_experiment: str | None = None) -> str:
    """A run's description (markdown): what differs from the committed ``params.yaml``
    (``changes``; None when it could not be read) at git ``commit`` (None: no repository),
    then ``facts`` (data, resolved values) as a list."""
    if commit is None:
        where = "the committed `params.yaml` (no git repository here)"
    else:
        where = f"`params.yaml` at git commit `{commit[:10]}`" + (
            ", with uncommitted changes" if dirty else "")
    if changes is None:
        head = f"**What differs from the baseline:** unknown: {where} could not be read."
    elif changes:
        rows = "\n".join(f"| `{k}` | {_cell(old)} | **{_cell(new)}** |" for k, old, new in changes)
        head = (f"**What differs from the committed baseline** ({where}):\n\n"
                f"| param | baseline | this run |\n| --- | --- | --- |\n{rows}")
    else:
        head = f"**The committed baseline:** no param differs from {where}."
    if dvc_experiment:
        head += f"\n\nDVC experiment `{dvc_experiment}`."
    lines = "\n".join(f"- {k}: {v}" for k, v in facts.items())
    return f"{head}\n\n{lines}" if facts else head


def _cell(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text.replace("|", "\\|")


def with_section(note: str, heading: str, text: str) -> str:
    """``note`` with the section ``### <heading>`` added at the end, or moved there with its
    new ``text`` when a stage that wrote it runs again."""
    head, *sections = note.split("\n\n### ")
    sections = [s for s in sections if not s.startswith(f"{heading}\n")]
    return "\n\n### ".join([head, *sections, f"{heading}\n{text}"])


def evaluation_section(name: str, version: str, metrics: dict, test_manifest: str,
                       test_images: int, decision: Promotion) -> str:
    """The evaluation part of a run's description: its registry version and the decision."""
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    link = version_route(name, version)
    return (
        f"Registered as [{name} v{version}]({link}): **{verdict}** ({decision.reason}).\n\n"
        f"test_accuracy **{metrics['test_accuracy']:.4f}** · test_top5_accuracy "
        f"{metrics['test_top5_accuracy']:.4f} · test_macro_f1 {metrics['test_macro_f1']:.4f} "
        f"on `{test_manifest}` ({test_images} images)."
    )


# -- the registered model and a version ------------------------------------------------------


def model_note(name: str) -> str:
    """The registered model's description: how to load it and what the aliases mean."""
    return (
        f"Food-101 ResNet50 transfer learning. Load the champion with "
        f"`mlflow.pyfunc.load_model(\"models:/{name}@{CHAMPION}\")`: it takes raw images (a "
        "DataFrame column `image` of bytes, or `path`) and returns `label`, `confidence` and "
        "`top5`; its preprocessing, class names and code travel with it.\n\n"
        f"Aliases: `{CHAMPION}` (what consumers load), `{CHALLENGER}` (the newest evaluated "
        f"version), `{PREVIOUS}` (what `python -m pipeline rollback` restores). Each version's "
        "description holds its test metrics, test manifest, run and promotion decision."
    )


def version_note(metrics: dict, test_manifest: str, test_images: int, manifest_sha256: str,
                 run_name: str, run_link: str, decision: Promotion | None) -> str:
    """A version's description: test accuracy, top-5, macro-F1, the test manifest, the run
    (a link into the UI), and the promotion decision."""
    text = (  # plain first line: the model page's versions table shows it as text
        f"test_accuracy {metrics['test_accuracy']:.4f} · "
        f"test_top5_accuracy {metrics['test_top5_accuracy']:.4f} · "
        f"test_macro_f1 {metrics['test_macro_f1']:.4f}\n\n"
        f"Test manifest `{test_manifest}` ({test_images} images, sha256 "
        f"`{manifest_sha256[:12]}`). Run [{run_name}]({run_link}).")
    if decision is not None:
        verdict = "promoted to champion" if decision.promoted else "not promoted"
        text += f"\n\n**{verdict}**: {decision.reason}."
    return text
