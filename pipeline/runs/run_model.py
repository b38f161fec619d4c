"""Running a registered model the way a consumer does: in a fresh ``python -I`` process.

This file is both halves:

- imported, :func:`predict_files` (the parent: the ``predict`` stage, the CLI, and the gate
  when it re-scores a champion) starts ``python -I <this file>`` in an empty folder, sends it
  what to run as JSON on stdin (a registered version of a local store as the folder its
  ``models:/`` URI resolves to, :func:`load_uri`), draws a progress bar from what it prints,
  and reads its predictions back;
- run by path, :func:`main` (the child) loads the model with MLflow and predicts.

The child is a consumer: ``-I`` (no ``PYTHONPATH``, no working directory or script folder on
``sys.path``), an empty working directory, and no editable install of this repository on the
import path. It imports the standard library, mlflow, pandas and torch, never this repository,
so the model runs the code it carries (MLflow puts its ``code/`` first on ``sys.path``), also
for versions logged by older code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

if __name__ != "__main__":  # imported (the parent); run by path, the child skips these
    from mlflow.exceptions import MlflowException

    from pipeline.errors import PipelineError
    from pipeline.progress import progress
    from pipeline.runs.store import (
        MISSING,
        client,
        configure,
        display_uri,
        is_local_store,
        store_call,
    )

    class ModelRunError(PipelineError):
        """A registered model failed to load or predict in its fresh process."""


def load_uri(model_uri: str) -> str:
    """What the child loads for ``model_uri``. A version of a local store
    (``models:/<name>/<version>``): the folder of that version's files, which is what
    ``models:/`` resolves to, so that the child opens no store (importing the SQL store and
    the registry lookup: ~0.5 s of its start); anything else (a server, an alias, a version
    that does not exist: the child says so): the URI itself."""
    name, _, version = model_uri.removeprefix("models:/").rpartition("/")
    if not (model_uri.startswith("models:/") and name and version.isdigit()
            and is_local_store()):
        return model_uri
    try:
        return store_call(f"find the files of {model_uri}",
                          client().get_model_version_download_uri, name, version,
                          allow=(MISSING,))
    except MlflowException:
        return model_uri


def predict_files(model_uri: str, paths: Sequence[Path], batch_size: int = 16,
                  desc: str = "predict") -> pd.DataFrame:
    """The model's predictions (label, confidence, top5) for image files, computed in a fresh
    process by the code the model carries, with a progress bar named ``desc``."""
    store = configure()
    with tempfile.TemporaryDirectory(prefix="food101-predict-") as tmp:
        out = Path(tmp) / "predictions.json"
        spec = {
            "tracking_uri": store, "model_uri": load_uri(model_uri), "out": str(out),
            "paths": [str(Path(p).resolve()) for p in paths],
            "params": {"batch_size": batch_size}, "threads": os.cpu_count() or 1,
            "chunk": batch_size * 8,  # whole inference batches: the same numbers as one call
        }
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(Path(tmp) / "stderr.txt", "w+") as err, progress(len(paths), desc) as bar:
            proc = subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve())],
                                    cwd=tmp, env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
            for line in proc.stdout:  # the child prints how many images are done
                if line.strip().isdigit():
                    bar.update(int(line) - bar.n)
            proc.wait()
            err.seek(0)
            stderr = err.read()
        if proc.returncode != 0:
            tail = "\n".join(stderr.strip().splitlines()[-12:])
            raise ModelRunError(
                f"running {model_uri} (from {display_uri(store)}) in a fresh process failed "
                f"(exit {proc.returncode}):\n{tail}"
            )
        return pd.DataFrame(json.loads(out.read_text()))


def main() -> None:
    """The child: read the spec from stdin, predict chunk by chunk (printing how many images
    are done after each), write the predictions as JSON, exit without teardown."""
    sys.dont_write_bytecode = True  # a local store's model folder is loaded in place
    sys.meta_path[:] = [f for f in sys.meta_path  # this repository's editable install
                        if not str(getattr(f, "__module__", "")).startswith("__editable__")]
    spec = json.load(sys.stdin)
    import mlflow
    import torch

    torch.set_num_threads(spec["threads"])
    mlflow.set_tracking_uri(spec["tracking_uri"])
    mlflow.set_registry_uri(spec["tracking_uri"])
    model = mlflow.pyfunc.load_model(spec["model_uri"], suppress_warnings=True)
    params = spec["params"] if model.metadata.get_params_schema() is not None else None
    paths, step = spec["paths"], spec["chunk"]
    parts = []
    for k in range(0, max(len(paths), 1), step):
        parts.append(model.predict(pd.DataFrame({"path": paths[k:k + step]}), params=params))
        print(min(k + step, len(paths)), flush=True)
    out = pd.concat(parts, ignore_index=True)
    with open(spec["out"], "w") as fh:
        json.dump(out.to_dict(orient="list"), fh)
    os._exit(0)  # skips tearing down torch and MLflow (~1.5 s); the output is closed


if __name__ == "__main__":
    main()
