"""Shared fixtures: tiny generated image folders, temporary MLflow stores, and one tiny model
trained, evaluated and promoted by the real jobs once per session.

Nothing here needs the network: images are generated, weights are random (``weights=none``).
Helpers that tests import are in ``helpers.py``.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow_schema
import pytest
from helpers import TINY_DEMO, URI_VARS, fresh_store, make_tiny_data, use_store
from mlflow.store.db import utils as db_utils
from mlflow.tracking._model_registry import utils as registry_uri_state
from mlflow.tracking._tracking_service import utils as tracking_uri_state

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "true")

# MLflow reads its ~70 migration scripts again for every store it opens (~0.07 s) to learn the
# newest schema revision, and the tests open a fresh store per test: the answer depends only
# on the installed package, so it is read once per session here.
db_utils._get_latest_schema_revision = functools.cache(db_utils._get_latest_schema_revision)


@pytest.fixture(scope="session", autouse=True)
def _own_compile_record(tmp_path_factory):
    """Extractions note their speed in a machine-wide record (pipeline/features/compiling.py):
    the tests' tiny images note theirs apart, and stages they start inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOOD101_COMPILE_RECORD",
                  str(tmp_path_factory.mktemp("compile") / "record.json"))
        yield


def _end_runs() -> None:
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A generated Food-101-layout folder: 4 classes x (16 train + 8 test) small JPEGs."""
    from pipeline.data.demo import generate_demo

    out = tmp_path_factory.mktemp("demo") / "food"
    generate_demo(out, workers=1, **TINY_DEMO)
    return out


@pytest.fixture(scope="session")
def learnable_demo(tmp_path_factory) -> Path:
    """A larger demo set (6 classes x (60 train + 20 test), 64-80 px) for learning checks."""
    from pipeline.data.demo import generate_demo

    out = tmp_path_factory.mktemp("demo_learn") / "food"
    generate_demo(out, classes=6, train_per_class=60, test_per_class=20, min_side=64,
                  max_side=80, seed=3, workers=2)
    return out


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite database with the schema already created (once per session).

    Creating the schema of a new store runs every migration (~5 s on 2 cores); it is loaded
    from ``fixtures/mlflow_schema.sql`` instead (~0.05 s) when that file was made by the
    installed MLflow's migrations (its alembic revision is the newest), and a copy of this
    empty database gives each test an equally fresh store in milliseconds.
    """
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    if mlflow_schema.schema_revision() == db_utils._get_latest_schema_revision():
        mlflow_schema.load(path, path.parent / "artifacts")
    else:  # another MLflow: its own migrations (tests/mlflow_schema.py says how to update)
        mlflow_schema.migrated(path, str(path.parent / "artifacts"))
    return path


@pytest.fixture(autouse=True)
def _mlflow_uris_put_back():
    """What the code under test sets with ``mlflow.set_tracking_uri``/``set_registry_uri``
    (``store.configure`` does, as the stages need) is put back after each test."""
    env = {var: os.environ.get(var) for var in URI_VARS}
    state = tracking_uri_state._tracking_uri, registry_uri_state._registry_uri
    yield
    tracking_uri_state._tracking_uri, registry_uri_state._registry_uri = state
    for var, value in env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch, migrated_db) -> str:
    """A fresh SQLite MLflow store (tracking + registry) for one test."""
    uri = fresh_store(tmp_path, migrated_db)
    use_store(monkeypatch, uri)
    yield uri
    _end_runs()


@pytest.fixture()
def feature_cache(tmp_path, monkeypatch) -> Path:
    """A private feature cache folder."""
    path = tmp_path / "features"
    monkeypatch.setenv("FOOD101_FEATURE_CACHE", str(path))
    return path


@pytest.fixture()
def gpus(monkeypatch):
    """``gpus(n)``: a machine that shows ``n`` CUDA GPUs (bf16-capable unless told otherwise)
    and no MPS. Mocked answers of ``torch.cuda``: tests check what is *chosen*; nothing runs
    on a GPU."""
    import torch

    from pipeline.model import devices

    def make(n: int, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mocked GPU")
        monkeypatch.setattr(devices, "mps_available", lambda: False)

    return make


@pytest.fixture(scope="session")
def _seed0_backbone():
    from pipeline.model.weights import build_backbone

    return build_backbone("resnet50", "none", 0)[0]


@pytest.fixture()
def backbone(_seed0_backbone):
    """A ResNet50 backbone as ``model.weights=none`` builds it (random init, seed 0), a copy of
    its own for each test: the random init costs ~0.5 s, a copy ~0.1 s."""
    return copy.deepcopy(_seed0_backbone)


@pytest.fixture(autouse=True)
def _two_threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture()
def tiny_data(tiny_demo, tmp_path):
    """Manifests drawn from ``tiny_demo`` (what sample + split produce)."""
    return make_tiny_data(tiny_demo, tmp_path)


@pytest.fixture(scope="session")
def champion(tiny_demo, tmp_path_factory, migrated_db) -> SimpleNamespace:
    """A tiny model trained, evaluated, registered and promoted (v1, the champion) by the real
    train and evaluate jobs, once per session, in a store and feature cache of its own.

    Tests that use it must not change its registry; ``champion_store`` points MLflow at it.
    """
    from pipeline.jobs.evaluate import TestData, evaluate_and_log
    from pipeline.jobs.train import TrainData, TrainRun, train_and_log

    tmp = tmp_path_factory.mktemp("champion")
    uri = fresh_store(tmp, migrated_db)
    cache = tmp / "features"
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, uri)
        data = make_tiny_data(tiny_demo, tmp)
        p = data.params
        trained = train_and_log(TrainRun.from_params(
            p, TrainData(data.root, data.classes, data.train, data.val), cache))
        evaluated = evaluate_and_log(TestData(data.root, data.classes, data.test), trained.run,
                                     p.registry, p.compute, cache)
        _end_runs()
    return SimpleNamespace(uri=uri, tmp=tmp, cache=cache, data=data, params=data.params,
                           trained=trained, evaluated=evaluated, name=p.registry.model_name)


@pytest.fixture()
def champion_store(champion, monkeypatch) -> SimpleNamespace:
    """MLflow pointed at the session's ``champion`` store for one test."""
    use_store(monkeypatch, champion.uri)
    yield champion
    _end_runs()
