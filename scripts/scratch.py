"""What the benchmark scripts share: a scratch clone of this repository's committed HEAD, and
an environment that runs the real pipeline there with this repository's .venv and nothing of
the caller's stores (its own MLflow store and feature cache inside the clone)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"


def pipeline_env(**extra: str) -> dict[str, str]:
    """This process's environment without the stores it may point to, with the venv first on
    PATH (DVC's stage commands and queued workers find it), telemetry off."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FOOD101_FEATURE_CACHE")}
    env.update(VIRTUAL_ENV=str(ROOT / ".venv"), MLFLOW_DISABLE_TELEMETRY="true",
               DVC_NO_ANALYTICS="true", PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def scratch_clone(dest: Path) -> Path:
    """A `git clone` of HEAD at ``dest`` (committed files only: no data, no DVC cache)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    return dest
