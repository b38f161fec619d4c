"""`mlflow models serve` of the champion, started inside a changed copy of the repository:
it answers with the labels of the pipeline's own evaluation, computed by the code the model
carries."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from helpers import REPO, free_port, stop_group, wait_for_http

pytestmark = pytest.mark.slow

SERVE_WAIT = 120  # seconds for /ping


def test_served_champion_runs_its_own_code(champion_store, tmp_path):
    c = champion_store
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copytree(REPO / "pipeline", clone / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = clone / "pipeline" / "model" / "__init__.py"
    init.write_text(init.read_text() + '\nraise ImportError("ran the repository copy")\n')

    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH, as when
    # the venv is activated (without it the server dies with "exec: uvicorn: not found")
    env.update(MLFLOW_TRACKING_URI=c.uri, PYTHONPATH=str(clone),
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    server = subprocess.Popen(
        [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m",
         f"models:/{c.name}@champion", "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port), "--workers", "1"],
        cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/ping", server, SERVE_WAIT, "mlflow models serve")

        paths = [c.data.root / p for p in c.data.test.frame["path"].head(3)]
        body = {"dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(p.read_bytes()).decode("ascii")] for p in paths],
        }, "params": {"batch_size": 2}}
        request = urllib.request.Request(
            f"{base}/invocations", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            pytest.fail(f"/invocations: HTTP {exc.code}: {exc.read().decode()[:4000]}")
        preds = answer["predictions"]
        assert [p["label"] for p in preds] == c.evaluated.confusion["predicted"].head(3).tolist()
        for pred in preds:
            assert 0.0 <= pred["confidence"] <= 1.0
            assert json.loads(pred["top5"])[0][0] == pred["label"]
    finally:
        stop_group(server, signal.SIGTERM)
