"""The MLflow Model Registry: versions, aliases, the promotion gate, promote and rollback.

Aliases: ``challenger`` (the newest evaluated version), ``champion`` (what consumers load),
``previous-champion`` (what a rollback restores). :func:`resolve` is the one way from an alias
or a version number to a :class:`ModelRef` (version, run, pinned ``models:/`` URI). Every
decision is returned as a :class:`~pipeline.handoffs.Promotion` (the stage writes it to
``reports/promotion.json``) and stored as version tags. Change the promotion rule in
:func:`decide`; the read-decide-write runs under :func:`~pipeline.runs.lock.promotion_lock`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import signals
from pipeline.errors import PipelineError
from pipeline.handoffs import ChampionRef, Promotion
from pipeline.runs import notes
from pipeline.runs.lock import Held, promotion_lock
from pipeline.runs.notes import CHALLENGER, CHAMPION, PREVIOUS
from pipeline.runs.store import EXISTS, MISSING, client, display_uri, store_call

log = logging.getLogger(__name__)


class RegistryError(PipelineError):
    """A model, version or alias the user asked for does not exist."""


@dataclass(frozen=True)
class ModelRef:
    """The registered version that an alias or a version number names now."""

    name: str
    ref: str  # what was asked for: an alias or a version number
    version: str
    run_id: str  # the run that trained it ("" when registered without one)

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``: pinned to the version, so what runs is what gets
        recorded even if the alias moves meanwhile."""
        return f"models:/{self.name}/{self.version}"

    def champion_file(self) -> ChampionRef:
        """What ``reports/champion.json`` records of it."""
        return ChampionRef(model_name=self.name, ref=self.ref, version=self.version,
                           run_id=self.run_id)


def _ref(name: str, ref: str, mv: ModelVersion) -> ModelRef:
    return ModelRef(name, str(ref), str(mv.version), mv.run_id or "")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- reading versions and aliases ------------------------------------------------------------


def _get_model(c: MlflowClient, name: str):
    """The registered model; only RESOURCE_DOES_NOT_EXIST means it is not there."""
    try:
        return store_call(f"read registered model {name!r}", c.get_registered_model, name,
                          allow=(MISSING,))
    except MlflowException as exc:
        raise RegistryError(
            f"registered model {name!r} does not exist in {display_uri()}: the registry "
            "is empty. Run the pipeline (`make run` or `dvc repro`) to train, evaluate and "
            "register a first version."
        ) from exc


def _aliases(model) -> dict[str, str]:
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def alias_version(name: str, alias: str, c: MlflowClient | None = None) -> ModelVersion | None:
    """The ModelVersion behind ``alias``, or None when the alias is not set (that is: absent
    from the model's alias list; any store error is raised, never read as "not set")."""
    c = c or client()
    version = _aliases(_get_model(c, name)).get(alias)
    return None if version is None else get_version(name, version, c)


def get_version(name: str, version: str | int, c: MlflowClient | None = None) -> ModelVersion:
    """Version ``version`` of ``name``; a RegistryError listing the versions when missing."""
    c = c or client()
    _get_model(c, name)
    try:
        return store_call(f"read version {version} of {name!r}", c.get_model_version, name,
                          str(version), allow=(MISSING,))
    except MlflowException as exc:
        found = store_call(f"list the versions of {name!r}", c.search_model_versions,
                           f"name='{name}'")
        versions = sorted(int(v.version) for v in found)
        raise RegistryError(
            f"{name!r} has no version {version}; versions: {versions or 'none'}") from exc


def resolve(name: str, ref: str) -> ModelRef:
    """The version that ``ref`` (an alias or a version number) names now; a RegistryError
    that says how to fix it when there is none."""
    c = client()
    if str(ref).isdigit():
        return _ref(name, ref, get_version(name, ref, c))
    mv = alias_version(name, ref, c)
    if mv is None:
        hint = (
            "Run `dvc repro` (evaluate promotes the first model), or "
            "`python -m pipeline promote <version>` to choose one."
            if ref == CHAMPION
            else "Set it with `python -m pipeline promote <version>`."
        )
        raise RegistryError(f"{name!r} has no version with alias '{ref}'. {hint}")
    return _ref(name, ref, mv)


def list_versions(name: str) -> list[dict]:
    """Every version, newest first, with aliases and recorded metrics."""
    c = client()
    # search_model_versions() on a SQLite store returns versions without their aliases.
    by_version: dict[str, list[str]] = {}
    for alias, ver in _aliases(_get_model(c, name)).items():
        by_version.setdefault(ver, []).append(alias)
    found = store_call(f"list the versions of {name!r}", c.search_model_versions,
                       f"name='{name}'")
    rows = [{
        "version": int(mv.version),
        "aliases": sorted(by_version.get(str(mv.version), [])),
        "test_accuracy": mv.tags.get("test_accuracy"),
        "test_macro_f1": mv.tags.get("test_macro_f1"),
        "promotion": mv.tags.get("promotion"),
        "run_id": mv.run_id,
        "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000).isoformat(
            timespec="seconds"),
    } for mv in found]
    return sorted(rows, key=lambda r: -r["version"])


# -- writing: register, the gate, promote, rollback ------------------------------------------


def register(model_uri: str, name: str, tags: dict) -> str:
    """A version of ``name`` for a logged model, created with its tags in one step (so no
    version exists without its evaluation), then given the ``challenger`` alias; returns the
    version number. A version already registered for the same run and model (an evaluate
    that was killed after registering) is reused."""
    c = client()
    try:
        store_call(f"create registered model {name!r}", c.create_registered_model, name,
                   description="Food-101 ResNet50 transfer learning", allow=(EXISTS,))
    except MlflowException:
        pass  # RESOURCE_ALREADY_EXISTS: registered before (or by a concurrent pipeline)
    tags = {k: str(v) for k, v in tags.items()}
    run_id = tags.get("run_id")
    existing = [mv for mv in store_call(
        f"look for versions of run {run_id}", c.search_model_versions,
        f"name='{name}' and run_id='{run_id}'") if mv.source == model_uri] if run_id else []
    if existing:
        mv = min(existing, key=lambda v: int(v.version))
        _tag_version(c, name, str(mv.version), tags)
        log.info("%s version %s was registered for this run before: reused", name, mv.version)
    else:
        # A logged model (models:/m-...) is registered with its id, as mlflow.register_model
        # does: an MLflow server refuses the source without it.
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith(
            "models:/m-") else None
        mv = store_call(f"register a version of {name!r}", c.create_model_version, name,
                        model_uri, run_id=run_id, tags=tags, model_id=model_id)
    _set_alias(c, name, CHALLENGER, str(mv.version))
    log.info("registered %s version %s (alias %s)", name, mv.version, CHALLENGER)
    return str(mv.version)


def _set_alias(c: MlflowClient, name: str, alias: str, version: str) -> None:
    store_call(f"set alias {alias}", c.set_registered_model_alias, name, alias, version)


def _set_champion(c: MlflowClient, name: str, version: str, old: ModelVersion | None) -> None:
    if old is not None and str(old.version) != str(version):
        _set_alias(c, name, PREVIOUS, str(old.version))
    _set_alias(c, name, CHAMPION, version)


def _tag_version(c: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        store_call(f"tag version {version} of {name!r}", c.set_model_version_tag, name,
                   version, key, value)


def decide(version: str, accuracy: float, champion: str | None,
           champion_accuracy: float | None, min_delta: float) -> tuple[bool, str]:
    """The promotion rule: (promoted, why). ``version`` becomes champion if there is none, or
    if its test accuracy beats the champion's (on the same test manifest) by more than
    ``min_delta``; between equal accuracies the lower version wins, whichever was gated
    first."""
    if champion is None:
        return True, "no champion yet"
    if str(champion) == str(version):
        return True, "already champion"
    # Compare at the 6 decimals that version tags store, so equal scores tie.
    mine, theirs = round(accuracy, 6), round(champion_accuracy + min_delta, 6)
    tie = round(accuracy, 6) == round(champion_accuracy, 6)
    if not mine > theirs and tie and int(version) < int(champion):
        return True, (f"test_accuracy {accuracy:.4f} ties champion v{champion}'s on the same "
                      "test manifest: the lower version wins")
    verb = "beats" if mine > theirs else "does not beat"
    return mine > theirs, (f"test_accuracy {accuracy:.4f} {verb} champion v{champion}'s "
                           f"{champion_accuracy:.4f} + min_delta {min_delta} on the same "
                           "test manifest")


GATE_ROUNDS = 3  # champions re-scored in a row (each replaced meanwhile) before giving up


def _recorded_accuracy(champ: ModelVersion, manifest_sha256: str) -> float | None:
    """The champion's test accuracy on ``manifest_sha256`` if it is recorded on it."""
    if champ.tags.get("test_manifest_sha256") == manifest_sha256:
        return float(champ.tags["test_accuracy"])
    key = f"test_accuracy.{manifest_sha256[:12]}"
    return float(champ.tags[key]) if key in champ.tags else None


def _champion_accuracy(c: MlflowClient, name: str, champ: ModelVersion, manifest_sha256: str,
                       evaluate: Callable[[str], float]) -> float:
    """The champion's test accuracy on ``manifest_sha256``: recorded, or measured now by
    ``evaluate(its pinned uri)`` and recorded on it (MLflow tag keys allow no "@")."""
    acc = _recorded_accuracy(champ, manifest_sha256)
    if acc is not None:
        return acc
    log.info("champion v%s was tested on another manifest: re-evaluating it", champ.version)
    acc = float(evaluate(_ref(name, CHAMPION, champ).uri))
    _tag_version(c, name, str(champ.version),
                 {f"test_accuracy.{manifest_sha256[:12]}": f"{acc:.6f}"})
    return acc


def gate(name: str, version: str, accuracy: float, manifest_sha256: str, min_delta: float,
         evaluate: Callable[[str], float], run_id: str = "") -> Promotion:
    """Decide whether ``version`` becomes champion (:func:`decide`), record the decision on
    the version, move the aliases; returns the decision.

    When the champion was measured on another manifest, ``evaluate(model_uri)`` re-measures
    it on this one (in a fresh process, with the code that model carries) *before* the
    promotion lock is taken: under the lock the champion is read again and the decision is
    made only if it is the one scored (else the new one is scored, up to
    :data:`GATE_ROUNDS` times). The read-decide-write runs under the lock and checks it
    before each write; the decision is recorded on the version before any alias moves, and a
    stop (SIGTERM, Ctrl-C) waits for both.
    """
    c = client()
    scored: dict[str, float] = {}  # champion version -> its accuracy on this manifest
    for _ in range(GATE_ROUNDS):
        champ = alias_version(name, CHAMPION, c)
        if champ is not None and str(champ.version) != str(version):
            scored[str(champ.version)] = _champion_accuracy(c, name, champ, manifest_sha256,
                                                            evaluate)
        with promotion_lock(name) as held:
            champ = alias_version(name, CHAMPION, c)
            champ_acc = None
            if champ is not None and str(champ.version) != str(version):
                champ_acc = scored.get(str(champ.version),
                                       _recorded_accuracy(champ, manifest_sha256))
                if champ_acc is None:  # a new champion since it was scored: score that one
                    log.info("champion is now v%s: scoring it before deciding", champ.version)
                    continue
            return _record_decision(c, held, Candidate(name, str(version), accuracy,
                                                       manifest_sha256, min_delta, run_id),
                                    champ, champ_acc)
    raise RegistryError(
        f"the champion of {name!r} changed {GATE_ROUNDS} times while this gate scored it; "
        f"v{version} is registered but undecided. Re-run the stage (`dvc repro`) to decide it."
    )


@dataclass(frozen=True)
class Candidate:
    """The version a gate decides on: its test accuracy, the test manifest it was measured
    on, the margin it must beat the champion by, and its MLflow run."""

    name: str
    version: str
    accuracy: float
    manifest_sha256: str
    min_delta: float
    run_id: str


def _record_decision(c: MlflowClient, held: Held, cand: Candidate, champ: ModelVersion | None,
                     champ_acc: float | None) -> Promotion:
    """Under the lock: decide, record the decision on the version, move the aliases."""
    name, version = cand.name, cand.version
    champion = str(champ.version) if champ else None
    promoted, reason = decide(version, cand.accuracy, champion, champ_acc, cand.min_delta)
    decision = Promotion(
        model_name=name, version=version, test_accuracy=cand.accuracy,
        test_manifest_sha256=cand.manifest_sha256, min_delta=cand.min_delta,
        champion_version=champion, champion_test_accuracy=champ_acc, decided_at=_now(),
        promoted=promoted, reason=reason, run_id=cand.run_id,
    )
    # The lock is checked once before the writes: they take well under a second, and
    # LOCK_MARGIN keeps a quarter of the expiry ahead of them.
    held.check()
    with signals.deferred():  # the record and the alias move, both or (SIGKILL) record
        _tag_version(c, name, version, {
            "promotion": "promoted" if promoted else "rejected",
            "promotion_reason": reason, "promotion_decided_at": decision.decided_at})
        if promoted:
            _set_champion(c, name, version, champ)
    log.info("%s v%s: %s (%s)", name, version, "PROMOTED" if promoted else "not promoted", reason)
    return decision


def promote(name: str, version: str | int) -> dict:
    """Make ``version`` the champion by hand; the old one becomes previous-champion."""
    c = client()
    mv = get_version(name, version, c)
    with promotion_lock(name) as held:
        old = alias_version(name, CHAMPION, c)
        if old is not None and str(old.version) == str(mv.version):
            prev = alias_version(name, PREVIOUS, c)
            return {"model_name": name, "champion": str(mv.version),
                    "previous_champion": str(prev.version) if prev else None,
                    "decided_at": _now(), "unchanged": True}
        held.check()
        with signals.deferred():
            _tag_version(c, name, str(mv.version), {"promotion": "promoted by hand",
                                                    "promotion_decided_at": _now()})
            _set_champion(c, name, str(mv.version), old)
    return {"model_name": name, "champion": str(mv.version),
            "previous_champion": str(old.version) if old else None, "decided_at": _now()}


def rollback(name: str) -> dict:
    """Give ``champion`` back to ``previous-champion``; the two swap places."""
    c = client()
    with promotion_lock(name) as held:
        prev = alias_version(name, PREVIOUS, c)
        if prev is None:
            raise RegistryError(
                f"{name!r} has no '{PREVIOUS}' alias: nothing to roll back to (a rollback "
                "needs an earlier champion). `python -m pipeline versions` lists versions."
            )
        cur = alias_version(name, CHAMPION, c)
        swap = cur is not None and str(cur.version) != str(prev.version)
        held.check()
        with signals.deferred():
            if swap:
                _tag_version(c, name, str(cur.version), {"promotion": "rolled back",
                                                         "promotion_decided_at": _now()})
            _set_alias(c, name, CHAMPION, str(prev.version))
            if swap:
                _set_alias(c, name, PREVIOUS, str(cur.version))
    return {"model_name": name, "champion": str(prev.version),
            "previous_champion": str(cur.version) if cur else None, "decided_at": _now()}


def describe(name: str, version: str, text: str) -> None:
    """Set the descriptions of version ``version`` and of the registered model."""
    c = client()
    store_call(f"describe version {version} of {name!r}", c.update_model_version, name,
               str(version), description=text)
    store_call(f"describe {name!r}", c.update_registered_model, name,
               description=notes.model_note(name))
