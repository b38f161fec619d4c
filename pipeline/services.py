"""Waiting for a server the pipeline (or a test) started: the one loop that polls its URL."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

from pipeline.errors import PipelineError

POLL_SECONDS = 0.3  # between two attempts


class ServiceError(PipelineError):
    """A started server exited, or did not answer in time; the message says which."""


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, *,
                  what: str = "the server", ok: tuple[int, ...] = (200,)) -> None:
    """Return once ``url`` answers with a status in ``ok``; a :class:`ServiceError` when
    ``proc`` (the server's process) exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return  # e.g. 401: up, and asking for credentials
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} did not answer {url} within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
