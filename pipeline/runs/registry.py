"""The MLflow Model Registry: versions, aliases, the promotion gate, and running a registered
model the way a consumer does.

One of the three modules that import MLflow (with ``tracking`` and the model's own
``pipeline.model.pyfunc``). Aliases: ``challenger`` (the newest evaluated version),
``champion`` (what consumers load), ``previous-champion`` (what a rollback restores). Every
decision is returned as a :class:`~pipeline.handoffs.Promotion` (the stage writes it to
``reports/promotion.json``) and stored as version tags. Change the promotion rule in
:func:`gate`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import signals
from pipeline.errors import PipelineError
from pipeline.handoffs import ChampionRef, Promotion
from pipeline.paths import project_root
from pipeline.progress import progress
from pipeline.runs import tracking

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"


class RegistryError(PipelineError):
    """A model, version or alias the user asked for does not exist."""


def client() -> MlflowClient:
    return tracking.client()


@contextlib.contextmanager
def promotion_lock(name: str) -> Iterator[None]:
    """Serialise read-decide-write of ``name``'s aliases between every pipeline that shares
    the store.

    MLflow has no compare-and-set for aliases. On one machine an exclusive ``flock`` on a
    local file does it (and is all a local SQLite store needs). A store on a server is
    shared by machines that share no file: there the holder also creates the registered
    model ``<name>.promotion-lock`` — a create is atomic on the server, so exactly one
    pipeline holds it — and deletes it when done (:func:`server_lock`).
    """
    lock = lock_path()
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if tracking.is_local_store():
                yield
            else:
                with server_lock(name):
                    yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


LOCK_SUFFIX = ".promotion-lock"
LOCK_TTL_SECONDS = 600.0  # a holder that has not released by then is taken for dead
LOCK_WAIT_SECONDS = 1200.0  # how long a gate waits for the lock before it gives up


@contextlib.contextmanager
def server_lock(name: str) -> Iterator[None]:
    """The promotion lock on the server: the registered model ``<name>.promotion-lock``,
    created with the holder's token, host and expiry as tags (one atomic request), deleted
    on release. A lock past its expiry is broken by exactly one waiter (see
    :func:`_break_if_expired`)."""
    c = client()
    lock = f"{name}{LOCK_SUFFIX}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    delay = 0.2
    while True:
        tags = {"token": token, "holder": f"{socket.gethostname()}:{os.getpid()}",
                "expires_at": f"{time.time() + LOCK_TTL_SECONDS:.3f}"}
        try:
            tracking.store_call(
                f"take the promotion lock {lock!r}", c.create_registered_model, lock,
                tags=tags, description="Held while a pipeline decides the champion of "
                f"{name!r}; deleted when it is done.", allow=(tracking.EXISTS,))
            break
        except MlflowException:  # RESOURCE_ALREADY_EXISTS: another pipeline holds it
            holder = _break_if_expired(c, lock)
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"the promotion lock {lock!r} on {tracking.display_uri()} is still held "
                    f"({holder}) after {LOCK_WAIT_SECONDS:.0f} s. If that pipeline is gone, "
                    f"delete the registered model {lock!r} (MLflow UI or API)."
                ) from None
            time.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 1.5, 2.0)
    try:
        yield
    finally:
        current = _lock_tags(c, lock)
        if current is not None and current.get("token") == token:
            tracking.store_call(f"release the promotion lock {lock!r}",
                                c.delete_registered_model, lock, allow=(tracking.MISSING,))
        else:
            log.warning("the promotion lock %s was no longer ours at release (broken as "
                        "expired?)", lock)


def _lock_tags(c: MlflowClient, lock: str) -> dict[str, str] | None:
    try:
        model = tracking.store_call(f"read the promotion lock {lock!r}",
                                    c.get_registered_model, lock, allow=(tracking.MISSING,))
    except MlflowException:
        return None  # released meanwhile
    return dict(model.tags or {})


def _break_if_expired(c: MlflowClient, lock: str) -> str:
    """Delete ``lock`` if its holder's expiry has passed; returns who holds it, for messages.

    Exactly one waiter breaks a given holder's lock: it must first create the registered
    model ``<lock>.break-<holder token>`` (atomic, like the lock); so a lock that another
    waiter broke and a third one took since is never deleted by mistake.
    """
    tags = _lock_tags(c, lock)
    if tags is None:
        return "released"
    holder = f"held by {tags.get('holder', '?')}"
    try:
        expires = float(tags.get("expires_at", "inf"))
    except ValueError:
        expires = float("inf")
    if time.time() < expires:
        return holder
    marker = f"{lock}.break-{tags.get('token', 'none')}"
    try:
        tracking.store_call(f"claim breaking {lock!r}", c.create_registered_model, marker,
                            allow=(tracking.EXISTS,))
    except MlflowException:
        return holder + ", being broken"
    try:
        again = _lock_tags(c, lock)
        if again is not None and again.get("token") == tags.get("token"):
            log.warning("breaking the promotion lock %s: %s, expired", lock, holder)
            tracking.store_call(f"break the promotion lock {lock!r}",
                                c.delete_registered_model, lock, allow=(tracking.MISSING,))
    finally:
        tracking.store_call(f"remove {marker!r}", c.delete_registered_model, marker,
                            allow=(tracking.MISSING,))
    return holder + ", broken"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _no_model(name: str) -> RegistryError:
    return RegistryError(
        f"registered model {name!r} does not exist in {tracking.display_uri()}: the registry "
        "is empty. Run the pipeline (`make run` or `dvc repro`) to train, evaluate and "
        "register a first version."
    )


def _get_model(c: MlflowClient, name: str):
    """The registered model; only RESOURCE_DOES_NOT_EXIST means it is not there."""
    try:
        return tracking.store_call(f"read registered model {name!r}", c.get_registered_model,
                                   name, allow=(tracking.MISSING,))
    except MlflowException as exc:
        raise _no_model(name) from exc


def _aliases(model) -> dict[str, str]:
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def alias_version(name: str, alias: str, c: MlflowClient | None = None):
    """The ModelVersion behind ``alias``, or None when the alias is not set (that is: absent
    from the model's alias list; any store error is raised, never read as "not set")."""
    c = c or client()
    version = _aliases(_get_model(c, name)).get(alias)
    return None if version is None else get_version(name, version, c)


def get_version(name: str, version: str | int, c: MlflowClient | None = None):
    c = c or client()
    _get_model(c, name)
    try:
        return tracking.store_call(f"read version {version} of {name!r}", c.get_model_version,
                                   name, str(version), allow=(tracking.MISSING,))
    except MlflowException as exc:
        raise RegistryError(
            f"{name!r} has no version {version}; versions: {_versions(c, name) or 'none'}"
        ) from exc


def _versions(c: MlflowClient, name: str) -> list[int]:
    found = tracking.store_call(f"list the versions of {name!r}", c.search_model_versions,
                                f"name='{name}'")
    return sorted(int(v.version) for v in found)


def lookup(name: str, ref: str, c: MlflowClient | None = None):
    """The ModelVersion that an alias or a version number names now; a RegistryError that
    says how to fix it when there is none."""
    c = c or client()
    if str(ref).isdigit():
        return get_version(name, ref, c)
    mv = alias_version(name, ref, c)
    if mv is None:
        hint = (
            "Run `dvc repro` (evaluate promotes the first model), or "
            "`python -m pipeline promote <version>` to choose one."
            if ref == CHAMPION
            else "Set it with `python -m pipeline promote <version>`."
        )
        raise RegistryError(f"{name!r} has no version with alias '{ref}'. {hint}")
    return mv


def resolve(name: str, ref: str) -> tuple[str, str]:
    """(``models:/name/<version>``, that version) for an alias or a version number. The URI
    is pinned to the version the alias points at now, so what runs is what gets recorded."""
    mv = lookup(name, ref)
    return f"models:/{name}/{mv.version}", str(mv.version)


def model_uri(name: str, ref: str) -> str:
    """The checked model URI of an alias or version reference."""
    return resolve(name, ref)[0]


def register(model_uri_: str, name: str, tags: dict) -> str:
    """A version of ``name`` for a logged model, created with its tags in one step (so no
    version exists without its evaluation), then given the ``challenger`` alias; returns the
    version number. A version already registered for the same run and model (an evaluate
    that was killed after registering) is reused."""
    c = client()
    try:
        tracking.store_call(f"create registered model {name!r}", c.create_registered_model,
                            name, description="Food-101 ResNet50 transfer learning",
                            allow=(tracking.EXISTS,))
    except MlflowException:
        pass  # RESOURCE_ALREADY_EXISTS: registered before (or by a concurrent pipeline)
    tags = {k: str(v) for k, v in tags.items()}
    run_id = tags.get("run_id")
    existing = [mv for mv in tracking.store_call(
        f"look for versions of run {run_id}", c.search_model_versions,
        f"name='{name}' and run_id='{run_id}'") if mv.source == model_uri_] if run_id else []
    if existing:
        mv = min(existing, key=lambda v: int(v.version))
        for key, value in tags.items():
            tracking.store_call(f"tag version {mv.version}", c.set_model_version_tag, name,
                                mv.version, key, value)
        log.info("%s version %s was registered for this run before: reused", name, mv.version)
    else:
        # A logged model (models:/m-...) is registered with its id, as mlflow.register_model
        # does: an MLflow server refuses the source without it.
        model_id = model_uri_.removeprefix("models:/") if model_uri_.startswith(
            "models:/m-") else None
        mv = tracking.store_call(f"register a version of {name!r}", c.create_model_version,
                                 name, model_uri_, run_id=run_id, tags=tags, model_id=model_id)
    tracking.store_call(f"set alias {CHALLENGER}", c.set_registered_model_alias, name,
                        CHALLENGER, mv.version)
    log.info("registered %s version %s (alias %s)", name, mv.version, CHALLENGER)
    return str(mv.version)


def _set_champion(c: MlflowClient, name: str, version: str, old) -> None:
    if old is not None and str(old.version) != str(version):
        tracking.store_call(f"set alias {PREVIOUS}", c.set_registered_model_alias, name,
                            PREVIOUS, str(old.version))
    tracking.store_call(f"set alias {CHAMPION}", c.set_registered_model_alias, name, CHAMPION,
                        version)


def _tag_version(c: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        tracking.store_call(f"tag version {version} of {name!r}", c.set_model_version_tag,
                            name, version, key, value)


def gate(
    name: str,
    version: str,
    accuracy: float,
    manifest_sha256: str,
    min_delta: float,
    evaluate: Callable[[str], float],
    run_id: str = "",
) -> Promotion:
    """Promote ``version`` to champion if there is none, or if its test accuracy beats the
    champion's **on the same test manifest** by more than ``min_delta``; between equal
    accuracies the lower version wins, whichever was gated first.

    When the champion was measured on another manifest, ``evaluate(model_uri)`` re-measures
    it on this one (in a fresh process, with the code that model carries). The whole
    read-decide-write runs under :func:`promotion_lock`; the decision is recorded on the
    version before any alias moves, and a stop (SIGTERM, Ctrl-C) waits for both.
    """
    c = client()
    with promotion_lock(name):
        champ = alias_version(name, CHAMPION, c)
        champ_acc = None
        if champ is None:
            promoted, reason = True, "no champion yet"
        elif str(champ.version) == str(version):
            promoted, reason = True, "already champion"
        else:
            key = f"test_accuracy.{manifest_sha256[:12]}"  # MLflow tag keys allow no "@"
            if champ.tags.get("test_manifest_sha256") == manifest_sha256:
                champ_acc = float(champ.tags["test_accuracy"])
            elif key in champ.tags:
                champ_acc = float(champ.tags[key])
            else:
                log.info("champion v%s was tested on another manifest: re-evaluating it",
                         champ.version)
                champ_acc = float(evaluate(f"models:/{name}/{champ.version}"))
                _tag_version(c, name, str(champ.version), {key: f"{champ_acc:.6f}"})
            # Compare at the 6 decimals that version tags store, so equal scores tie.
            mine, theirs = round(accuracy, 6), round(champ_acc + min_delta, 6)
            tie = round(accuracy, 6) == round(champ_acc, 6)
            older = int(version) < int(champ.version)
            promoted = mine > theirs or (tie and older)
            if promoted and not mine > theirs:
                reason = (f"test_accuracy {accuracy:.4f} ties champion v{champ.version}'s on "
                          "the same test manifest: the lower version wins")
            else:
                verb = "beats" if promoted else "does not beat"
                reason = (
                    f"test_accuracy {accuracy:.4f} {verb} champion v{champ.version}'s "
                    f"{champ_acc:.4f} + min_delta {min_delta} on the same test manifest"
                )
        _test_pause()
        decision = Promotion(
            model_name=name, version=str(version), test_accuracy=accuracy,
            test_manifest_sha256=manifest_sha256, min_delta=min_delta,
            champion_version=str(champ.version) if champ else None,
            champion_test_accuracy=champ_acc, decided_at=_now(), promoted=promoted,
            reason=reason, run_id=run_id,
        )
        with signals.deferred():  # the record and the alias move, both or (SIGKILL) record
            _tag_version(c, name, str(version), {
                "promotion": "promoted" if promoted else "rejected",
                "promotion_reason": reason, "promotion_decided_at": decision.decided_at})
            if promoted:
                _set_champion(c, name, str(version), champ)
    log.info("%s v%s: %s (%s)", name, version, "PROMOTED" if promoted else "not promoted", reason)
    return decision


def _test_pause() -> None:
    """For tests of concurrent gates only: a pause between reading the champion and writing
    the decision, so that gates started together really overlap."""
    pause = os.environ.get("FOOD101_TEST_GATE_PAUSE")
    if pause:
        time.sleep(float(pause))


def promote(name: str, version: str | int) -> dict:
    """Make ``version`` the champion by hand; the old one becomes previous-champion."""
    c = client()
    mv = get_version(name, version, c)
    with promotion_lock(name):
        old = alias_version(name, CHAMPION, c)
        if old is not None and str(old.version) == str(mv.version):
            prev = alias_version(name, PREVIOUS, c)
            return {"model_name": name, "champion": str(mv.version),
                    "previous_champion": str(prev.version) if prev else None,
                    "decided_at": _now(), "unchanged": True}
        with signals.deferred():
            _tag_version(c, name, str(mv.version), {"promotion": "promoted by hand",
                                                    "promotion_decided_at": _now()})
            _set_champion(c, name, str(mv.version), old)
    return {"model_name": name, "champion": str(mv.version),
            "previous_champion": str(old.version) if old else None, "decided_at": _now()}


def rollback(name: str) -> dict:
    """Give ``champion`` back to ``previous-champion``; the two swap places."""
    c = client()
    with promotion_lock(name):
        prev = alias_version(name, PREVIOUS, c)
        if prev is None:
            raise RegistryError(
                f"{name!r} has no '{PREVIOUS}' alias: nothing to roll back to (a rollback "
                "needs an earlier champion). `python -m pipeline versions` lists versions."
            )
        cur = alias_version(name, CHAMPION, c)
        with signals.deferred():
            if cur is not None and str(cur.version) != str(prev.version):
                _tag_version(c, name, str(cur.version), {"promotion": "rolled back",
                                                         "promotion_decided_at": _now()})
            tracking.store_call(f"set alias {CHAMPION}", c.set_registered_model_alias, name,
                                CHAMPION, prev.version)
            if cur is not None and str(cur.version) != str(prev.version):
                tracking.store_call(f"set alias {PREVIOUS}", c.set_registered_model_alias,
                                    name, PREVIOUS, cur.version)
    return {"model_name": name, "champion": str(prev.version),
            "previous_champion": str(cur.version) if cur else None, "decided_at": _now()}


def list_versions(name: str) -> list[dict]:
    """Every version, newest first, with aliases and recorded metrics."""
    c = client()
    # search_model_versions() on a SQLite store returns versions without their aliases.
    by_version: dict[str, list[str]] = {}
    for alias, ver in _aliases(_get_model(c, name)).items():
        by_version.setdefault(ver, []).append(alias)
    rows = []
    found = tracking.store_call(f"list the versions of {name!r}", c.search_model_versions,
                                f"name='{name}'")
    for mv in found:
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(by_version.get(str(mv.version), [])),
            "test_accuracy": mv.tags.get("test_accuracy"),
            "test_macro_f1": mv.tags.get("test_macro_f1"),
            "promotion": mv.tags.get("promotion"),
            "run_id": mv.run_id,
            "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000).isoformat(
                timespec="seconds"),
        })
    return sorted(rows, key=lambda r: -r["version"])


def lock_path() -> Path:
    """Beside the SQLite file of a local store; for a store on a server, the project's
    ``.cache/`` (nothing is written under ``mlruns/`` then)."""
    uri = tracking.tracking_uri()
    if tracking.is_local_store(uri):
        return Path(uri.removeprefix("sqlite:///")).parent / "registry.lock"
    return project_root() / ".cache" / "registry.lock"


# -- running a registered model ------------------------------------------------------------

# A fresh interpreter that loads the model the way a consumer does: `python -I` (no
# PYTHONPATH, no working directory on sys.path) started in an empty folder, without the
# editable install of this repository on the import path. So the model runs the code it
# carries (MLflow puts its code/ first on sys.path), never this checkout's current copy.
_RUN_MODEL = r"""
import json, sys
sys.dont_write_bytecode = True  # a local store's model folder is loaded in place
sys.meta_path[:] = [f for f in sys.meta_path
                    if not str(getattr(f, "__module__", "")).startswith("__editable__")]
spec = json.load(sys.stdin)
import mlflow, pandas as pd, torch
torch.set_num_threads(spec["threads"])
mlflow.set_tracking_uri(spec["tracking_uri"])
mlflow.set_registry_uri(spec["tracking_uri"])
model = mlflow.pyfunc.load_model(spec["model_uri"], suppress_warnings=True)
params = spec["params"] if model.metadata.get_params_schema() is not None else None
paths, step = spec["paths"], spec["chunk"]
parts = []
for k in range(0, max(len(paths), 1), step):  # one line "<done>" per chunk: the progress
    parts.append(model.predict(pd.DataFrame({"path": paths[k:k + step]}), params=params))
    print(min(k + step, len(paths)), flush=True)
out = pd.concat(parts, ignore_index=True)
with open(spec["out"], "w") as fh:
    json.dump(out.to_dict(orient="list"), fh)
import os
os._exit(0)  # skips tearing down torch and MLflow (~1.5 s); the output is closed
"""


def predict_files(model_uri: str, paths: Sequence[Path], batch_size: int = 16,
                  desc: str = "predict") -> pd.DataFrame:
    """The model's predictions (label, confidence, top5) for image files, computed in a fresh
    process by the code the model carries (also for versions logged by older code), with a
    progress bar named ``desc``."""
    store = tracking.configure()
    with tempfile.TemporaryDirectory(prefix="food101-predict-") as tmp:
        out = Path(tmp) / "predictions.json"
        spec = {
            "tracking_uri": store, "model_uri": model_uri, "out": str(out),
            "paths": [str(Path(p).resolve()) for p in paths],
            "params": {"batch_size": batch_size}, "threads": os.cpu_count() or 1,
            "chunk": batch_size * 8,  # whole inference batches: the same numbers as one call
        }
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(Path(tmp) / "stderr.txt", "w+") as err, progress(len(paths), desc) as bar:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _RUN_MODEL], cwd=tmp, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    text=True)
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
            raise RegistryError(
                f"running {model_uri} (from {tracking.display_uri(store)}) in a fresh "
                f"process failed "
                f"(exit {proc.returncode}):\n{tail}"
            )
        return pd.DataFrame(json.loads(out.read_text()))


def champion_ref(name: str, ref: str) -> ChampionRef:
    """The version (and its training run) that ``ref`` names now, for ``reports/champion.json``."""
    mv = lookup(name, ref)
    return ChampionRef(model_name=name, ref=str(ref), version=str(mv.version),
                       run_id=mv.run_id or "")


# -- descriptions people read in the UI ----------------------------------------------------


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


def describe(name: str, version: str, text: str) -> None:
    """Set the descriptions of version ``version`` and of the registered model."""
    c = client()
    tracking.store_call(f"describe version {version} of {name!r}", c.update_model_version,
                        name, str(version), description=text)
    tracking.store_call(f"describe {name!r}", c.update_registered_model, name,
                        description=model_note(name))


def run_section(name: str, version: str, metrics: dict, test_manifest: str, test_images: int,
                decision: Promotion) -> str:
    """The evaluation part of a run's description: its registry version and the decision."""
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    link = tracking.version_route(name, version)
    return (
        f"Registered as [{name} v{version}]({link}): **{verdict}** ({decision.reason}).\n\n"
        f"test_accuracy **{metrics['test_accuracy']:.4f}** · test_top5_accuracy "
        f"{metrics['test_top5_accuracy']:.4f} · test_macro_f1 {metrics['test_macro_f1']:.4f} "
        f"on `{test_manifest}` ({test_images} images)."
    )
