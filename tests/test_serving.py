"""The logged model as its consumers use it: registered and promoted by the real evaluate job,
loaded in a process that cannot import this repository, served over HTTP, and used by the
predict job.

One tiny model is trained (the real ``train_and_log``) and evaluated (the real
``evaluate_and_log``) once for the whole module: training a ResNet50, even a tiny one, costs
~20 s on 2 cores, too much to repeat per test. The fixture does what conftest's ``tiny_data``
+ ``trained_run`` do, in a store and feature cache of its own that live for the module.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline import registry, tracking
from pipeline.registry import RegistryError

TIMEOUT = 180  # seconds for a child process; the server must answer /ping within SERVE_WAIT
SERVE_WAIT = 90


@pytest.fixture(scope="module")
def champion(tiny_demo, tmp_path_factory, migrated_db):
    """tiny_data + trained_run + evaluate_and_log, once: the champion of a private store."""
    from conftest import fresh_store, make_tiny_data

    from pipeline.jobs import evaluate_and_log, train_and_log

    tmp = tmp_path_factory.mktemp("serving")
    uri = fresh_store(tmp, migrated_db)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("FOOD101_FEATURE_CACHE", str(tmp / "features"))
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)

        data = make_tiny_data(tiny_demo, tmp)
        params, root, classes, manifests = data.params, data.root, data.classes, data.manifests
        trained = train_and_log(params, root, classes,
                                {k: manifests[k] for k in ("train", "val")}, None,
                                tmp / "figures")
        run = {"run_id": trained.run_id, "model_uri": trained.model_uri}
        evaluated = evaluate_and_log(params, root, classes, manifests["test"], run,
                                     figures_dir=tmp / "figures")
        yield SimpleNamespace(
            uri=uri, tmp=tmp, params=params, root=root, classes=classes, manifests=manifests,
            test=data.test, unlabeled=data.unlabeled, key=data.key,
            trained=trained, run=run, evaluated=evaluated,
            name=params.registry.model_name,
        )
        while mlflow.active_run():
            mlflow.end_run()


@pytest.fixture()
def env(champion) -> dict:
    """The environment of a child process: the module's store, this repository not on the path."""
    out = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    out.update(MLFLOW_TRACKING_URI=champion.uri, MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="true")
    return out


@pytest.fixture(scope="module")
def loaded(champion):
    """The champion loaded in this process (once: loading a ResNet50 takes a second or two)."""
    return tracking.load_pyfunc(f"models:/{champion.name}@champion")


@pytest.fixture(scope="module")
def pipeline_labels(champion, loaded):
    """The labels the pipeline's own evaluation code gives the test images: (labels, probs)."""
    from pipeline.jobs import _score_manifest

    clf = loaded.unwrap_python_model()
    probs = _score_manifest(clf, champion.root, champion.test, champion.tmp / "features", 0)
    return [champion.classes[i] for i in probs.argmax(1)], probs


def test_evaluate_and_log_registers_and_promotes(champion):
    ev = champion.evaluated
    assert set(ev.metrics) == {"test_accuracy", "test_top5_accuracy", "test_macro_f1"}
    for value in ev.metrics.values():
        assert 0.0 <= value <= 1.0
    assert ev.metrics["test_top5_accuracy"] >= ev.metrics["test_accuracy"]

    # the metrics are against the true labels of the test manifest
    assert len(ev.confusion) == len(champion.test)
    assert ev.confusion["actual"].tolist() == champion.test["label"].tolist()
    acc = float((ev.confusion["actual"] == ev.confusion["predicted"]).mean())
    assert ev.metrics["test_accuracy"] == pytest.approx(acc)
    assert ev.per_class["class"].tolist() == champion.classes
    assert ev.per_class["support"].sum() == len(champion.test)

    # the training run now also holds the evaluation
    run = mlflow.get_run(champion.run["run_id"])
    for key, value in ev.metrics.items():
        assert run.data.metrics[key] == pytest.approx(value)
    assert run.data.tags["registered_version"] == "1"
    assert run.data.tags["promotion"] == "promoted"
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(champion.run["run_id"], "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/per_class_report.csv",
            "evaluation/confusion_matrix.csv", "evaluation/promotion.json"} <= artifacts
    local = Path(client.download_artifacts(champion.run["run_id"], "evaluation",
                                           str(champion.tmp / "downloaded")))
    assert (local / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = pd.read_csv(local / "per_class_report.csv")
    assert report["class"].tolist() == champion.classes
    assert json.loads((local / "promotion.json").read_text())["promoted"] is True
    assert (champion.tmp / "figures" / "confusion_matrix.png").stat().st_size > 0

    # registered as version 1 and made champion: the first model
    d = ev.decision
    assert d["promoted"] is True
    assert d["reason"] == "no champion yet"
    assert d["version"] == "1"
    assert d["run_id"] == champion.run["run_id"]
    assert registry.resolved_version(champion.name, "champion") == "1"
    mv = registry.get_version(champion.name, 1)
    assert mv.run_id == champion.run["run_id"]
    assert mv.tags["test_accuracy"] == f"{ev.metrics['test_accuracy']:.6f}"
    assert mv.tags["test_manifest_sha256"] == tracking.file_sha256(champion.manifests["test"])
    assert mv.tags["promotion"] == "promoted"


FRESH_PROCESS = r"""
import sys
sys.modules["pipeline"] = None  # nothing from this repository may be imported
sys.modules["stages"] = None
import json
import mlflow
import pandas as pd

spec = json.loads(sys.argv[1])
model = mlflow.pyfunc.load_model(spec["uri"])
images = [open(p, "rb").read() for p in spec["paths"]]
by_bytes = model.predict(pd.DataFrame({"image": images}))
by_path = model.predict(pd.DataFrame({"path": spec["paths"]}))
own = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages")
             and sys.modules[m] is not None)
print("RESULT " + json.dumps({
    "bytes": by_bytes.to_dict(orient="list"),
    "path": by_path.to_dict(orient="list"),
    "columns": list(by_bytes.columns),
    "repository_modules": own,
}))
"""


def test_champion_loads_and_predicts_in_a_fresh_process(champion, env, pipeline_labels,
                                                         tmp_path):
    paths = [str(champion.root / p) for p in champion.test["path"]]
    spec = {"uri": f"models:/{champion.name}@champion", "paths": paths}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(spec)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["repository_modules"] == []
    assert out["columns"] == ["label", "confidence", "top5"]

    labels, probs = pipeline_labels
    assert out["bytes"]["label"] == labels
    assert out["path"]["label"] == labels  # a path column gives the same answers
    # same numbers, not just the same argmax: one preprocessing and forward pass everywhere
    np.testing.assert_allclose(out["bytes"]["confidence"], probs.max(1), atol=1e-4)
    np.testing.assert_allclose(out["path"]["confidence"], out["bytes"]["confidence"], atol=1e-6)
    k = min(5, len(champion.classes))
    for i, (conf, top5) in enumerate(zip(out["bytes"]["confidence"], out["bytes"]["top5"],
                                         strict=True)):
        assert 0.0 <= conf <= 1.0
        pairs = json.loads(top5)
        assert len(pairs) == k
        assert pairs[0][0] == labels[i]
        assert [p[0] for p in pairs] == [champion.classes[j] for j in np.argsort(-probs[i])[:k]]
        scores = [p[1] for p in pairs]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)


def test_pyfunc_input_forms_and_errors(champion, loaded):
    model = loaded
    paths = [str(champion.root / p) for p in champion.test["path"].head(3)]
    data = [Path(p).read_bytes() for p in paths]
    by_bytes = model.predict(pd.DataFrame({"image": data}))
    by_path = model.predict(pd.DataFrame({"path": paths}))
    # bytes win over a path in the same row; a row may use either column
    mixed = model.predict(pd.DataFrame({"image": [data[0], None, data[2]],
                                        "path": ["/nonexistent.jpg", paths[1], None]}))
    assert by_bytes["label"].tolist() == by_path["label"].tolist() == mixed["label"].tolist()
    np.testing.assert_allclose(mixed["confidence"], by_bytes["confidence"], atol=1e-6)
    with pytest.raises(ValueError, match="give image bytes in column 'image' or a file"):
        model.predict(pd.DataFrame({"image": [None], "path": [None]}))


def test_predict_and_log_labels_every_unlabeled_image(champion):
    from pipeline.jobs import predict_and_log

    out, metrics = predict_and_log(champion.params, champion.unlabeled,
                                   champion.manifests["unlabeled_key"], champion.run)
    files = sorted(p.name for p in champion.unlabeled.iterdir())
    assert len(files) == champion.params.sample.unlabeled_size
    assert out["file"].tolist() == files
    assert list(out.columns) == ["file", "label", "confidence", "top5"]
    assert set(out["label"]) <= set(champion.classes)
    assert out["confidence"].between(0, 1).all()

    truth = champion.key.set_index("file")["label"]
    expected = float((out["label"] == out["file"].map(truth)).mean())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["accuracy"] == pytest.approx(expected)
    assert metrics["images"] == len(files)
    assert metrics["model_version"] == 1

    run = mlflow.get_run(champion.run["run_id"])
    assert run.data.metrics["predict_accuracy"] == pytest.approx(expected)
    assert run.data.tags["predict_model_version"] == "1"
    client = mlflow.MlflowClient()
    local = client.download_artifacts(champion.run["run_id"], "predict/predictions.csv",
                                      str(champion.tmp / "downloaded_predict"))
    logged = pd.read_csv(local)
    assert logged["file"].tolist() == files
    assert logged["label"].tolist() == out["label"].tolist()


def test_predict_and_log_without_champion(champion):
    from conftest import tiny_params

    from pipeline.jobs import predict_and_log

    params = tiny_params(registry={"model_name": "other"})
    assert params.registry.model_name == "other"
    args = (params, champion.unlabeled, champion.manifests["unlabeled_key"], champion.run)
    before = mlflow.get_run(champion.run["run_id"]).data
    with pytest.raises(RegistryError, match="'other' does not exist.*registry is empty"):
        predict_and_log(*args)

    # registered, but never promoted: no champion
    registry.register(champion.run["model_uri"], "other", {"run_id": champion.run["run_id"]})
    with pytest.raises(RegistryError) as err:
        predict_and_log(*args)
    assert "'other' has no version with alias 'champion'" in str(err.value)
    assert "promote" in str(err.value)
    after = mlflow.get_run(champion.run["run_id"]).data
    assert after.tags == before.tags  # nothing was logged to the run
    assert after.metrics == before.metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_all(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        return "(no output)"
    return out or ""


def test_served_champion_answers_with_a_label(champion, env, pipeline_labels, tmp_path):
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    mlflow_bin = bin_dir / "mlflow"
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH, as when
    # the venv is activated (without it the server dies with "exec: uvicorn: not found")
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    server = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", f"models:/{champion.name}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_WAIT
        while True:
            if server.poll() is not None:
                pytest.fail(f"the server exited ({server.returncode}):\n{_read_all(server)}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                os.killpg(server.pid, signal.SIGKILL)
                pytest.fail(f"no /ping within {SERVE_WAIT} s:\n{_read_all(server)}")
            time.sleep(0.5)

        paths = [champion.root / p for p in champion.test["path"].head(2)]
        body = {"dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(p.read_bytes()).decode("ascii")] for p in paths],
        }}
        request = urllib.request.Request(
            f"{base}/invocations", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                assert resp.status == 200
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            pytest.fail(f"/invocations: HTTP {exc.code}: {exc.read().decode()[:4000]}")
        preds = answer["predictions"]
        assert len(preds) == len(paths)
        labels, _ = pipeline_labels
        for i, pred in enumerate(preds):
            assert pred["label"] in champion.classes
            assert pred["label"] == labels[i]
            assert 0.0 <= pred["confidence"] <= 1.0
            assert json.loads(pred["top5"])[0][0] == pred["label"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=15)
        if server.stdout:
            server.stdout.close()
