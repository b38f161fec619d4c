"""The logged model as its consumers use it: loaded in a process that imports nothing from this
repository, run with the code it carries even when started inside a changed copy of the
repository, and models logged by the pipeline's older code still loading.

The model is the session's ``champion`` (trained and evaluated by the real jobs, conftest).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import REPO, champion_network, log_legacy_model

from pipeline.compute import resolve_compute
from pipeline.config import ComputeConfig
from pipeline.features.scoring import score_manifest
from pipeline.model.pyfunc import load_network, signature
from pipeline.runs import run_model

TIMEOUT = 300

# Loads a model, predicts from bytes and from paths, and reports which files its modules
# came from. Nothing from this repository is imported by the script itself.
CONSUMER = r"""
import json, sys
import mlflow, pandas as pd
spec = json.loads(sys.argv[1])
model = mlflow.pyfunc.load_model(spec["uri"])
images = [open(p, "rb").read() for p in spec["paths"]]
by_bytes = model.predict(pd.DataFrame({"image": images}), params={"batch_size": 3})
by_path = model.predict(pd.DataFrame({"path": spec["paths"]}))
files = {name: getattr(m, "__file__", None) or "" for name, m in list(sys.modules.items())}
print("RESULT " + json.dumps({
    "bytes": by_bytes.to_dict(orient="list"),
    "path": by_path.to_dict(orient="list"),
    "columns": list(by_bytes.columns),
    "module_files": files,
}), flush=True)
import os
os._exit(0)  # no interpreter teardown: the test lane waits for it
"""


def _consume(uri: str, paths: list[str], cwd: Path, env: dict, isolated: bool) -> dict:
    args = [sys.executable, *(["-I"] if isolated else []), "-c", CONSUMER,
            json.dumps({"uri": uri, "paths": paths})]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture()
def env(champion_store) -> dict:
    """A child's environment: the champion's store, nothing of this repository on the path."""
    import os

    out = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    out.update(MLFLOW_TRACKING_URI=champion_store.uri, MLFLOW_DISABLE_TELEMETRY="true")
    return out


def _test_paths(champion) -> list[str]:
    return [str(champion.data.root / p) for p in champion.data.test.frame["path"]]


@pytest.mark.slow  # end to end: a fresh interpreter loads the model from the registry
def test_a_fresh_isolated_process_predicts_what_the_evaluation_did(champion_store, env,
                                                                   tmp_path):
    """`python -I` outside the repository: the labels of the pipeline's own evaluation."""
    c = champion_store
    out = _consume(f"models:/{c.name}@champion", _test_paths(c), tmp_path, env, isolated=True)
    assert out["columns"] == ["label", "confidence", "top5", "error"]
    assert out["bytes"]["error"] == [None] * len(out["bytes"]["label"])
    evaluated = c.evaluated.confusion["predicted"].tolist()
    assert out["bytes"]["label"] == evaluated
    assert out["path"]["label"] == evaluated

    # nothing was imported from this checkout; the model's package came from its code/
    repo_files = [f for f in out["module_files"].values()
                  if f.startswith(str(REPO) + "/") and "/.venv/" not in f]
    assert repo_files == []
    carried = out["module_files"]["pipeline.model.card"]
    assert "/code/pipeline/model/card.py" in carried

    # the same numbers as the evaluate job's scoring path, not just the same argmax
    net, card = champion_network(c, tmp_path)
    cpu = resolve_compute(ComputeConfig(device="cpu", num_workers=0))
    probs = score_manifest(card, net.state_dict(), c.data.root, c.data.test.frame, cpu, None)
    np.testing.assert_allclose(out["bytes"]["confidence"], probs.max(1), atol=1e-5)
    np.testing.assert_allclose(out["path"]["confidence"], out["bytes"]["confidence"],
                               atol=1e-6)
    k = min(5, len(c.data.classes))
    for i, top5 in enumerate(out["bytes"]["top5"]):
        pairs = json.loads(top5)
        assert [p[0] for p in pairs] == [c.data.classes[j] for j in np.argsort(-probs[i])[:k]]
        scores = [p[1] for p in pairs]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)


def _tampered_copy(tmp_path: Path) -> Path:
    """A copy of the repository whose model package fails on import: a process that runs it
    instead of the model's own code cannot predict."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copytree(REPO / "pipeline", clone / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = clone / "pipeline" / "model" / "__init__.py"
    init.write_text(init.read_text() + '\nraise ImportError("ran the repository copy")\n')
    return clone


@pytest.mark.slow
def test_a_process_started_in_a_changed_repository_runs_the_code_the_model_carries(
        champion_store, env, tmp_path):
    c = champion_store
    clone = _tampered_copy(tmp_path)
    env = {**env, "PYTHONPATH": str(clone)}  # the changed copy first on the path, as in a repo
    out = _consume(f"models:/{c.name}@champion", _test_paths(c)[:4], clone, env,
                   isolated=False)
    assert out["bytes"]["label"] == c.evaluated.confusion["predicted"].tolist()[:4]
    assert "/code/pipeline/model/__init__.py" in out["module_files"]["pipeline.model"]
    # and the pipeline's own way of running a registered model does the same
    preds = run_model.predict_files(f"models:/{c.name}@champion", _test_paths(c)[:4])
    assert preds["label"].tolist() == out["bytes"]["label"]


def test_input_forms_params_and_errors(champion_store):
    c = champion_store
    model = mlflow.pyfunc.load_model(f"models:/{c.name}@champion")
    paths = _test_paths(c)[:3]
    data = [Path(p).read_bytes() for p in paths]
    by_bytes = model.predict(pd.DataFrame({"image": data}))
    by_path = model.predict(pd.DataFrame({"path": paths}), params={"batch_size": 1})
    # bytes win over a path in the same row; a row may use either column
    mixed = model.predict(pd.DataFrame({"image": [data[0], None, data[2]],
                                        "path": ["/nonexistent.jpg", paths[1], None]}))
    assert by_bytes["label"].tolist() == by_path["label"].tolist() == mixed["label"].tolist()
    np.testing.assert_allclose(mixed["confidence"].astype(float),
                               by_bytes["confidence"].astype(float), atol=1e-6)
    # a row without an image, or with an unreadable one, gets an error and no label; the
    # other rows are still labelled
    odd = model.predict(pd.DataFrame({"image": [None, b"not an image", data[1]],
                                      "path": [None, None, None]}))
    assert odd["label"].tolist()[:2] == [None, None]
    assert odd["label"].tolist()[2] == by_bytes["label"].tolist()[1]
    assert "give bytes in column 'image'" in odd["error"][0]
    assert "not a readable image" in odd["error"][1] and odd["error"][2] is None


def test_the_device_is_the_consumers_and_can_be_chosen(champion_store):
    """Loaded here (no GPU) it runs on the CPU; model_config={"device": ...} picks one."""
    c = champion_store
    model = mlflow.pyfunc.load_model(f"models:/{c.name}@champion")
    clf = model.unwrap_python_model().classifier
    assert clf.device.type == "cpu" and next(clf.net.parameters()).device.type == "cpu"
    chosen = mlflow.pyfunc.load_model(f"models:/{c.name}@champion",
                                      model_config={"device": "cpu"})
    assert chosen.unwrap_python_model().classifier.device.type == "cpu"
    with pytest.raises(Exception, match="device cuda"):  # this machine has no GPU
        mlflow.pyfunc.load_model(f"models:/{c.name}@champion", model_config={"device": "cuda"})


def test_signature_input_example_and_requirements(champion_store):
    c = champion_store
    info = mlflow.models.get_model_info(c.trained.run.model_uri)
    assert info.signature == signature()
    assert info.signature.params.to_dict()[0]["name"] == "batch_size"
    local = Path(mlflow.artifacts.download_artifacts(c.trained.run.model_uri))
    reqs = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} >= {"mlflow", "torch", "torchvision", "pillow"}
    assert (local / "code" / "pipeline" / "__init__.py").is_file()
    carried = sorted(p.name for p in (local / "code" / "pipeline" / "model").glob("*.py"))
    assert carried == sorted(p.name for p in (REPO / "pipeline" / "model").glob("*.py"))
    assert sorted(p.name for p in (local / "code" / "pipeline").iterdir()
                  if p.name != "__pycache__") == ["__init__.py", "model"]  # nothing else
    assert (local / "serving_input_example.json").is_file()


@pytest.mark.slow
def test_a_model_logged_by_the_old_code_still_predicts(champion_store, tmp_path):
    c = champion_store
    uri = log_legacy_model(c, tmp_path)
    preds = run_model.predict_files(uri, _test_paths(c), batch_size=4)
    assert preds["label"].tolist() == c.evaluated.confusion["predicted"].tolist()
    with pytest.raises(Exception, match="older version of the pipeline"):
        load_network(Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "d"))))
