"""Where the project lives, also when DVC runs a stage in a temporary experiment workspace.

``dvc exp run --temp`` and queued experiments execute in ``<repo>/.dvc/tmp/exps/<tmpdir>``.
Anything that must outlive that directory (the MLflow store, the feature cache) is resolved
against the real repository root, never against the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

_EXPS_MARKER = (".dvc", "tmp", "exps")


def project_root(start: str | Path | None = None) -> Path:
    """The repository root that owns ``start`` (default: the working directory).

    Inside ``<root>/.dvc/tmp/exps/...`` this is ``<root>``, so temporary experiment runs
    write to the same stores as runs in the workspace.
    """
    here = Path(start or os.getcwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - len(_EXPS_MARKER) + 1):
        if parts[i : i + len(_EXPS_MARKER)] == _EXPS_MARKER:
            return Path(*parts[:i])
    return here


def resolve_user_path(path: str | Path, start: str | Path | None = None) -> Path:
    """An absolute path for a user-given path: relative ones are relative to the real root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (project_root(start) / p).resolve()


def feature_cache_dir() -> Path:
    """The shared, content-keyed backbone feature cache (``FOOD101_FEATURE_CACHE`` overrides)."""
    env = os.environ.get("FOOD101_FEATURE_CACHE")
    return Path(env).resolve() if env else project_root() / ".cache" / "features"
