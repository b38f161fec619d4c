"""The team setup, for people: a real PostgreSQL and ``mlflow server`` on it with proxied
artifacts, started in the background and stopped again (``make server`` / ``make
server-stop``), optionally behind MLflow's own basic-auth app; and the DVC remote
(``make remote``).

    python -m pipeline.team start [--data .team] [--host 127.0.0.1] [--port 5005] [--auth]
    python -m pipeline.team stop  [--data .team]
    python -m pipeline.team remote DIR

PostgreSQL comes from the PyPI wheel ``pgserver`` (the real server binaries, installed with
the project's ``team`` extra: no system package, no root). ``initdb`` and ``postgres`` refuse
to run as root, so as root they run as the unprivileged user ``nobody``. Everything lives in
the data folder (git-ignored) and survives a restart:

    <data>/postgres/      the database cluster (owned by nobody when started as root)
    <data>/pginstall/     as root, a copy of PostgreSQL where nobody cannot reach the venv's
    <data>/artifacts/     what clients upload through the server (proxied artifacts)
    <data>/auth/          basic-auth: the secret key, the admin password (mode 0600), users
    <data>/mlflow.log     the MLflow server's log
    <data>/server.json    ports and pids of the running services
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pipeline.errors import PipelineError
from pipeline.services import ServiceError, wait_for_http

DEFAULT_PORT = 5005
START_TIMEOUT = 120.0  # seconds for PostgreSQL and MLflow (its first start migrates the schema)
UNPRIVILEGED = "nobody"
ADMIN = "admin"


class TeamServerError(PipelineError):
    """The team server could not be started or stopped; the message says why."""


def _pg_install() -> Path:
    """The PostgreSQL installation of the ``pgserver`` wheel (found, not imported: its module
    would start servers of its own)."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise TeamServerError(
            "PostgreSQL is not installed: `.venv/bin/pip install -e '.[team]'` (the Makefile's "
            "`make server` does it)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _pg_bin(name: str, data: Path | None = None) -> str:
    """A PostgreSQL binary. One that ``nobody`` runs (as root: pass the data folder) must be
    reachable by it; where the venv is not (a clone under /root, mode 0700), it runs from a
    copy of the installation in ``<data>/pginstall``."""
    install = _pg_install()
    if data is not None and os.geteuid() == 0 and _unreachable(install / "bin" / name):
        install = _copied_install(install, data)
    return str(install / "bin" / name)


def _copied_install(source: Path, data: Path) -> Path:
    """A copy of the installation ``source`` (``…/pgserver/pginstall``) under
    ``<data>/pginstall``, copied again when ``source`` changes. The layout is kept: PostgreSQL
    finds its libraries and share files relative to its binaries, and the wheel's binaries
    find their bundled libraries in ``pgserver.libs`` beside the package (rpath
    ``$ORIGIN/../../../pgserver.libs``)."""
    root = data / "pginstall"
    stamp = f"{source} {(source / 'bin' / 'postgres').stat().st_mtime_ns}"
    installed = root / "pgserver" / "pginstall"
    if (root / ".copied-from").is_file() and (root / ".copied-from").read_text() == stamp:
        return installed
    tmp = data / f".pginstall.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for part in ("bin", "lib", "share"):
        shutil.copytree(source / part, tmp / "pgserver" / "pginstall" / part, symlinks=True)
    libs = source.parent.parent / "pgserver.libs"
    if libs.is_dir():
        shutil.copytree(libs, tmp / "pgserver.libs", symlinks=True)
    (tmp / ".copied-from").write_text(stamp)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return installed


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as ``nobody``."""
    if os.geteuid() == 0:
        # util-linux's runuser is in /usr/sbin, which a minimal PATH (`env -i`, cron) lacks
        runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
        if runuser is None:
            raise TeamServerError("running as root needs `runuser` (util-linux) to start "
                                  "PostgreSQL as another user; or run `make server` as a user")
        return [runuser, "-u", UNPRIVILEGED, "--", *cmd]
    return cmd


def _unreachable(path: Path) -> Path | None:
    """The first folder above ``path`` that other users (``nobody``) may not enter, if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return parent
    return None


def _check_reachable(data: Path) -> None:
    """As root, PostgreSQL runs as ``nobody``, which must be able to walk down to ``data``."""
    parent = _unreachable(data)
    if parent is not None:
        raise TeamServerError(
            f"{parent} is not reachable by the user {UNPRIVILEGED!r} that PostgreSQL runs "
            f"as (root may not run it): `chmod o+x {parent}`, or choose a data folder "
            "whose parents are (TEAM_DIR=...)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int | None) -> bool:
    """A running process (a zombie, exited but not yet reaped by its parent, is not)."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _state(data: Path) -> dict | None:
    f = data / "server.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _auth_env(data: Path) -> dict[str, str]:
    """Basic auth: the secret key, the admin password and the users' database, generated once
    into ``<data>/auth`` (mode 0600) and reused at every start."""
    auth = data / "auth"
    auth.mkdir(parents=True, exist_ok=True)
    os.chmod(auth, 0o700)
    for name in ("secret_key", "admin_password"):
        if not (auth / name).is_file():
            _write_private(auth / name, secrets.token_urlsafe(32))
    ini = auth / "basic_auth.ini"
    _write_private(ini, "\n".join([
        "[mlflow]",
        # New users may read everything; a pipeline user needs EDIT on the experiment and
        # the registered model (docs/team.md "Access").
        "default_permission = READ",
        f"database_uri = sqlite:///{auth / 'basic_auth.db'}",
        f"admin_username = {ADMIN}",
        f"admin_password = {(auth / 'admin_password').read_text().strip()}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "",
    ]))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": (auth / "secret_key").read_text().strip()}


def start(data: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          pg_port: int | None = None, auth: bool = False) -> dict:
    """Start PostgreSQL and ``mlflow server`` in the background (or find them running);
    returns the state: uri, ports, pids. Idempotent."""
    data = data.resolve()
    state = _state(data)
    if state and _alive(state.get("mlflow_pid")):
        return state
    if state:
        stop(data)  # left over from a crash: stop what remains, then start afresh
    data.mkdir(parents=True, exist_ok=True)
    pgdata = data / "postgres"
    pg_port = pg_port or _free_port()
    if os.geteuid() == 0:
        _check_reachable(data)
        pgdata.mkdir(exist_ok=True)
        nobody = pwd.getpwnam(UNPRIVILEGED)
        os.chown(pgdata, nobody.pw_uid, nobody.pw_gid)
        os.chmod(data, 0o755)  # nobody must reach its data folder
    if not (pgdata / "PG_VERSION").is_file():
        init = subprocess.run(_as_postgres_user([_pg_bin("initdb", data), "-D", str(pgdata), "-U",
                                                 "postgres", "--auth=trust", "-E", "UTF8",
                                                 "--no-instructions"]),
                              capture_output=True, text=True)
        if init.returncode != 0:
            raise TeamServerError(f"initdb failed: {init.stdout}{init.stderr}")
    options = (f"-p {pg_port} -c listen_addresses=127.0.0.1 "
               f"-c unix_socket_directories={pgdata}")
    started = time.monotonic()
    proc = subprocess.run(_as_postgres_user([_pg_bin("pg_ctl", data), "-D", str(pgdata), "-l",
                                             str(pgdata / "postgres.log"), "-o", options,
                                             "-w", "-t", str(int(START_TIMEOUT)), "start"]),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise TeamServerError(f"PostgreSQL did not start: {proc.stdout}{proc.stderr}"
                              f"(log: {pgdata / 'postgres.log'})")
    psql = [_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "-tAc"]
    exists = subprocess.run([*psql, "SELECT 1 FROM pg_database WHERE datname='mlflow'"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if exists != "1":
        subprocess.run([*psql, "CREATE DATABASE mlflow"], capture_output=True, check=True)
    backend = f"postgresql://postgres@127.0.0.1:{pg_port}/mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
           "--artifacts-destination", str(data / "artifacts"), "--serve-artifacts",
           "--host", host, "--port", str(port), "--workers", "1"]
    if auth:
        env.update(_auth_env(data))
        cmd += ["--app-name", "basic-auth"]
    log = open(data / "mlflow.log", "ab")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    state = {"uri": f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}",
             "host": host, "port": port, "pg_port": pg_port, "mlflow_pid": server.pid,
             "auth": auth, "data": str(data)}
    (data / "server.json").write_text(json.dumps(state, indent=2) + "\n")
    try:
        wait_for_http(f"{state['uri']}/health", server, START_TIMEOUT, what="mlflow server",
                      ok=(200, 401) if auth else (200,))  # 401: up, asking for credentials
    except ServiceError as exc:
        stop(data)
        tail = (data / "mlflow.log").read_text(errors="replace")[-3000:]
        raise TeamServerError(f"{exc}; mlflow.log ends with:\n{tail}") from None
    users_db = data / "auth" / "basic_auth.db"
    if auth and users_db.is_file():  # MLflow creates it with the umask's mode (0644)
        users_db.chmod(0o600)
    state["start_seconds"] = round(time.monotonic() - started, 1)
    return state


def stop(data: Path) -> bool:
    """Stop the MLflow server and PostgreSQL started from ``data``; True when something ran."""
    data = data.resolve()
    state = _state(data)
    ran = False
    if state and _alive(state.get("mlflow_pid")):
        ran = True
        pid = state["mlflow_pid"]
        try:
            os.killpg(pid, signal.SIGTERM)  # the server and its worker
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pgdata = data / "postgres"
    if (pgdata / "postmaster.pid").is_file():
        ran = True
        subprocess.run(_as_postgres_user([_pg_bin("pg_ctl", data), "-D", str(pgdata), "-m", "fast",
                                          "-w", "stop"]), capture_output=True, text=True)
    (data / "server.json").unlink(missing_ok=True)
    return ran


def add_remote(folder: Path, repo: Path = Path(".")) -> str:
    """Make ``folder`` (an absolute path outside the repository) this clone's default DVC
    remote, in ``.dvc/config.local`` (per clone, not in git)."""
    folder = folder.expanduser().resolve()
    if folder.is_relative_to(repo.resolve()):
        raise TeamServerError(f"DIR={folder} is inside the repository: give a folder outside "
                              "it (beside it, or on a shared disk)")
    folder.mkdir(parents=True, exist_ok=True)
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    subprocess.run([dvc, "remote", "add", "--local", "--default", "--force", "team",
                    str(folder)], cwd=repo, check=True, capture_output=True, text=True)
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.team", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start PostgreSQL + mlflow server in the background")
    p.add_argument("--data", type=Path, default=Path(".team"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--pg-port", type=int, default=None)
    p.add_argument("--auth", action="store_true", help="MLflow's basic-auth app")
    p = sub.add_parser("stop", help="stop them")
    p.add_argument("--data", type=Path, default=Path(".team"))
    p = sub.add_parser("remote", help="set this clone's default DVC remote")
    p.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            state = start(args.data, args.host, args.port, args.pg_port, args.auth)
            took = f" in {state['start_seconds']} s" if "start_seconds" in state else \
                " (already running)"
            print(f"PostgreSQL on 127.0.0.1:{state['pg_port']} and MLflow on {state['uri']}"
                  f"{took}; data in {state['data']}")
            print(f"export MLFLOW_TRACKING_URI={state['uri']}")
            if state["auth"]:
                print(f"basic auth: user {ADMIN}, password: "
                      f"cat {Path(state['data']) / 'auth' / 'admin_password'}")
                print("export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...")
        elif args.command == "stop":
            print("stopped" if stop(args.data) else "nothing was running")
        else:
            print(f"default DVC remote (in .dvc/config.local): {add_remote(args.dir)}")
            print("then: dvc push --run-cache   /   in a fresh clone: dvc pull --run-cache")
    except (TeamServerError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"error: {exc} {detail}".strip(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
