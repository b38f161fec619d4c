"""The promotion lock: one pipeline at a time reads, decides and writes a model's aliases.

MLflow has no compare-and-set for aliases. On one machine an exclusive ``flock`` on a local
file does it (and is all a local SQLite store needs). A store on a server is shared by
machines that share no file: there the holder also creates the registered model
``<name>.promotion-lock`` — a create is atomic on the server, so exactly one pipeline holds
it — and deletes it when done; a holder that died is broken after its expiry.

Nothing slow runs under the lock (the gate re-scores a champion before it takes it), and
every write under it first checks that the lock is still this holder's, with a margin before
its expiry (:meth:`Held.check`): a gate never writes under a lock it may have lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError
from pipeline.paths import project_root
from pipeline.runs.store import (
    EXISTS,
    MISSING,
    client,
    display_uri,
    is_local_store,
    sqlite_path,
    store_call,
)

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
LOCK_TTL_ENV = "FOOD101_LOCK_TTL_SECONDS"
LOCK_TTL_SECONDS = 600.0  # default: a holder that has not released by then is taken for dead
LOCK_WAIT_SECONDS = 1200.0  # how long a gate waits for the lock before it gives up
LOCK_MARGIN = 0.25  # a write needs this fraction of the expiry still ahead of it


class LockError(PipelineError):
    """The promotion lock is still held by another pipeline; the message says by whom."""


def lock_ttl() -> float:
    """The expiry of a promotion lock on a server, in seconds (``FOOD101_LOCK_TTL_SECONDS``,
    default :data:`LOCK_TTL_SECONDS`): how long a dead holder keeps the others waiting. Every
    pipeline sharing a server should use the same value."""
    raw = os.environ.get(LOCK_TTL_ENV, "")
    try:
        value = float(raw) if raw else LOCK_TTL_SECONDS
    except ValueError:
        value = 0.0
    if not value >= 1:
        raise LockError(f"{LOCK_TTL_ENV}={raw!r}: expected a number of seconds (>= 1)")
    return value


def lock_path() -> Path:
    """Beside the SQLite file of a local store; for a store on a server, the project's
    ``.cache/`` (nothing is written under ``mlruns/`` then)."""
    db = sqlite_path()
    return (db.parent if db else project_root() / ".cache") / "registry.lock"


class Held:
    """The promotion lock as its holder has it: :meth:`check` before each write under it."""

    def __init__(self, lock: str = "", token: str = "", expires: float = float("inf"),
                 ttl: float = LOCK_TTL_SECONDS):
        self.lock, self.token, self.expires, self.ttl = lock, token, expires, ttl

    def check(self) -> None:
        """Raise :class:`LockError` unless the lock is still ours with a margin before its
        expiry (a local file lock cannot be lost: always fine)."""
        if not self.token:
            return
        left = self.expires - time.time()
        tags = _lock_tags(client(), self.lock)
        ours = tags is not None and tags.get("token") == self.token
        if not ours or left < LOCK_MARGIN * self.ttl:
            why = f"it expires in {left:.0f} s" if ours else "it was broken or released"
            raise LockError(
                f"the promotion lock {self.lock!r} on {display_uri()} is no longer safely "
                f"held ({why}); nothing more was written under it. Re-run the stage "
                "(`dvc repro`) to decide again."
            )


@contextlib.contextmanager
def promotion_lock(name: str) -> Iterator[Held]:
    """Serialise read-decide-write of ``name``'s aliases between every pipeline that shares
    the store: a file lock on this machine, and :func:`server_lock` for a store on a
    server. Yields the :class:`Held` lock: check it before each write."""
    lock = lock_path()
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if is_local_store():
                yield Held()
            else:
                with server_lock(name) as held:
                    yield held
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def server_lock(name: str) -> Iterator[Held]:
    """The promotion lock on the server: the registered model ``<name>.promotion-lock``,
    created with the holder's token, host and expiry as tags (one atomic request), deleted
    on release. A lock past its expiry is broken by exactly one waiter (see
    :func:`_break_if_expired`)."""
    c = client()
    lock = f"{name}{LOCK_SUFFIX}"
    token = uuid.uuid4().hex
    ttl = lock_ttl()
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    delay = 0.2
    while True:
        expires = time.time() + ttl
        tags = {"token": token, "holder": f"{socket.gethostname()}:{os.getpid()}",
                "expires_at": f"{expires:.3f}"}
        try:
            store_call(f"take the promotion lock {lock!r}", c.create_registered_model, lock,
                       tags=tags, description="Held while a pipeline decides the champion "
                       f"of {name!r}; deleted when it is done.", allow=(EXISTS,))
            break
        except MlflowException:  # RESOURCE_ALREADY_EXISTS: another pipeline holds it
            holder = _break_if_expired(c, lock)
            if time.monotonic() > deadline:
                raise LockError(
                    f"the promotion lock {lock!r} on {display_uri()} is still held "
                    f"({holder}) after {LOCK_WAIT_SECONDS:.0f} s. If that pipeline is gone, "
                    f"delete the registered model {lock!r} (MLflow UI or API)."
                ) from None
            time.sleep(delay + random.uniform(0, delay))  # backoff with jitter
            delay = min(delay * 1.5, 2.0)
    try:
        yield Held(lock, token, expires, ttl)
    finally:
        current = _lock_tags(c, lock)
        if current is not None and current.get("token") == token:
            store_call(f"release the promotion lock {lock!r}", c.delete_registered_model,
                       lock, allow=(MISSING,))
        else:
            log.warning("the promotion lock %s was no longer ours at release (broken as "
                        "expired?)", lock)


def _lock_tags(c: MlflowClient, lock: str) -> dict[str, str] | None:
    try:
        model = store_call(f"read the promotion lock {lock!r}", c.get_registered_model, lock,
                           allow=(MISSING,))
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
        store_call(f"claim breaking {lock!r}", c.create_registered_model, marker,
                   allow=(EXISTS,))
    except MlflowException:
        return holder + ", being broken"
    try:
        again = _lock_tags(c, lock)
        if again is not None and again.get("token") == tags.get("token"):
            log.warning("breaking the promotion lock %s: %s, expired", lock, holder)
            store_call(f"break the promotion lock {lock!r}", c.delete_registered_model, lock,
                       allow=(MISSING,))
    finally:
        store_call(f"remove {marker!r}", c.delete_registered_model, marker, allow=(MISSING,))
    return holder + ", broken"
