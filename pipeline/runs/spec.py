"""What a new pipeline run is, before it is opened: its experiment, its name (what differs
from the committed ``params.yaml``), its tags (git state, DVC experiment, params hash) and
every param.

The difference from the committed params is computed once per run, in :func:`run_spec` (one
``git show``), and carried by the :class:`RunSpec`: the run's name and its description both
read it from there.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import yaml

from pipeline.config import ConfigError, Params, params_from_dict
from pipeline.runs.notes import Change


@dataclass(frozen=True)
class Baseline:
    """The committed ``params.yaml`` a run is compared with (read once per run)."""

    commit: str | None  # git HEAD (in a DVC experiment: its baseline); None: no repository
    dirty: bool | None  # uncommitted changes to tracked files; None: unknown
    changes: tuple[Change, ...] | None  # what this run changed; None: params.yaml unreadable


@dataclass(frozen=True)
class RunSpec:
    """What a new pipeline run is: experiment, name, tags and every (flattened) param."""

    experiment: str
    name: str
    tags: dict[str, str]
    params: dict  # every param, flattened: what MLflow logs
    model_name: str = ""  # registry.model_name, which the experiment's description links
    baseline: Baseline | None = None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def committed_params() -> dict | None:
    """The flat params of params.yaml at git HEAD (None when there is none to read)."""
    text = _git("show", "HEAD:params.yaml")
    try:
        return params_from_dict(yaml.safe_load(text)).flat() if text else None
    except (yaml.YAMLError, ConfigError):
        return None


def param_changes(current: dict, committed: dict) -> list[Change]:
    """``(key, committed value, this run's value)`` for every param that differs from the
    committed ones, sorted by key (a key the committed params lack has ``None`` there)."""
    return [(k, committed.get(k), current[k]) for k in sorted(current)
            if k not in committed or committed[k] != current[k]]


def read_baseline(current: dict) -> Baseline:
    """Git state and the params that differ from the committed params.yaml (three git
    commands, once per run)."""
    commit = _git("rev-parse", "HEAD") or None
    status = _git("status", "--porcelain", "--untracked-files=no")
    committed = committed_params()
    return Baseline(commit, None if status is None else bool(status),
                    None if committed is None else tuple(param_changes(current, committed)))


def run_name(changes: Sequence[Change] | None, keys: Iterable[str]) -> str:
    """``<dvc exp name>: lr=0.001 epochs=3`` (a param by its last part unless another of
    ``keys`` shares it), or ``baseline`` when nothing differs."""
    leaves = [k.split(".")[-1] for k in keys]
    short = [(key if leaves.count(key.split(".")[-1]) > 1 else key.split(".")[-1], new)
             for key, _, new in changes or ()]
    text = " ".join(f"{k}={v}" for k, v in short) or "baseline"
    prefix = os.environ.get("DVC_EXP_NAME", "")
    return f"{prefix}: {text}" if prefix else text


def git_tags(baseline: Baseline) -> dict[str, str]:
    """Commit and dirty flag of the working tree, and the DVC experiment."""
    commit = baseline.commit or "unknown"
    tags = {
        "git_commit": commit,
        "git_dirty": "unknown" if baseline.dirty is None else str(baseline.dirty).lower(),
        "mlflow.source.git.commit": commit,
    }
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"),
                     ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def run_spec(params: Params, stage: str = "train") -> RunSpec:
    """The run of this pipeline execution: named after what differs from the committed
    params, tagged with git state, DVC experiment and the params hash."""
    flat = params.flat()
    baseline = read_baseline(flat)
    tags = {**git_tags(baseline), "params_hash": params.digest(), "stage": stage}
    return RunSpec(params.mlflow.experiment, run_name(baseline.changes, flat), tags, flat,
                   params.registry.model_name, baseline)
