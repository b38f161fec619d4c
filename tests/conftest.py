"""Shared fixtures: tiny generated image folders and a temporary MLflow store.

Nothing here needs the network: images are generated, weights are random (``weights=none``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_MINI = REPO.parent / "shared" / "datasets" / "food101-mini"

TINY_DEMO = dict(classes=4, train_per_class=16, test_per_class=8, min_side=48, max_side=64,
                 seed=7)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A generated Food-101-layout folder: 4 classes x (16 train + 8 test) small JPEGs."""
    from pipeline.demo import generate_demo

    out = tmp_path_factory.mktemp("demo") / "food"
    generate_demo(out, workers=1, **TINY_DEMO)
    return out


@pytest.fixture(scope="session")
def learnable_demo(tmp_path_factory) -> Path:
    """A larger demo set (6 classes x (60 train + 20 test), 64-80 px) for learning checks."""
    from pipeline.demo import generate_demo

    out = tmp_path_factory.mktemp("demo_learn") / "food"
    generate_demo(out, classes=6, train_per_class=60, test_per_class=20, min_side=64,
                  max_side=80, seed=3, workers=2)
    return out


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite database with the schema already created (once per session).

    Creating the schema of a new store runs every migration (~5 s on 2 cores); copying an
    empty, migrated database file gives each test an equally fresh store in milliseconds.
    """
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "artifacts")).engine.dispose()
    return path


def fresh_store(folder: Path, migrated_db: Path) -> str:
    """A new SQLite store in ``folder/mlruns`` (a copy of the migrated template); its URI."""
    (folder / "mlruns").mkdir(parents=True)
    shutil.copyfile(migrated_db, folder / "mlruns" / "mlflow.db")
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch, migrated_db) -> str:
    """A fresh SQLite MLflow store (tracking + registry) for one test."""
    uri = fresh_store(tmp_path, migrated_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture()
def feature_cache(tmp_path, monkeypatch) -> Path:
    """A private feature cache folder."""
    path = tmp_path / "features"
    monkeypatch.setenv("FOOD101_FEATURE_CACHE", str(path))
    return path


@pytest.fixture(autouse=True)
def _two_threads():
    import torch

    torch.set_num_threads(2)


def tiny_params(**overrides):
    """Params for tiny, fast runs (32 px images, small samples); ``section=dict`` overrides."""
    from pipeline.config import params_from_dict

    raw = {
        "data": {"image_size": 32},
        "demo": dict(TINY_DEMO),
        "sample": {"size": 48, "test_size": 16, "unlabeled_size": 6, "seed": 1},
        "split": {"val_fraction": 0.25},
        "train": {"epochs": 2, "batch_size": 16, "log_every": 1, "num_workers": 0,
                  "feature_batch_size": 16},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return params_from_dict(raw)


def make_tiny_data(demo_root: Path, folder: Path) -> SimpleNamespace:
    """Manifests drawn from a demo folder with the library (what sample + split produce)."""
    from pipeline.sampling import draw_sample, split_sample
    from pipeline.sources import index_food101

    params = tiny_params()
    root, index, classes = index_food101(demo_root)
    res = draw_sample(root, index, classes, params.sample, params.data.image_size,
                      folder / "unlabeled")
    train, val = split_sample(res.sample, params.split)
    manifests = {}
    for name, df in (("train", train), ("val", val), ("test", res.test),
                     ("unlabeled_key", res.unlabeled_key)):
        manifests[name] = folder / f"{name}.csv"
        df.to_csv(manifests[name], index=False)
    return SimpleNamespace(root=root, classes=res.report["classes"], params=params,
                           manifests=manifests, unlabeled=folder / "unlabeled",
                           train=train, val=val, test=res.test, key=res.unlabeled_key)


@pytest.fixture()
def tiny_data(tiny_demo, tmp_path):
    """Manifests drawn from ``tiny_demo`` (what sample + split produce)."""
    return make_tiny_data(tiny_demo, tmp_path)


@pytest.fixture()
def trained_run(tiny_data, mlflow_store, feature_cache, tmp_path):
    """A tiny model trained and logged by the real train job: (tiny_data, TrainOutputs)."""
    from pipeline.jobs import train_and_log

    out = train_and_log(tiny_data.params, tiny_data.root, tiny_data.classes,
                        {k: tiny_data.manifests[k] for k in ("train", "val")}, None,
                        tmp_path / "figures")
    return tiny_data, out
