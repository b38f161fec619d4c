"""Team mode, for real: PostgreSQL + `mlflow server` with proxied artifacts (pipeline.team),
the pipeline from two clones at once against it, promotion safe across processes that share
no file, basic auth, and a DVC remote that a fresh clone reproduces from.

Every server runs on free loopback ports in a temporary folder and is stopped at the end,
also when a test fails. All slow: each one starts services or runs `dvc repro`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest
from helpers import (
    free_port,
    log_echo_model,
    make_project,
    poll,
    project_client,
    ran_stages,
    sh,
    use_store,
)

from pipeline import team
from pipeline.runs import store, tracking

pytestmark = pytest.mark.slow

NAME = "food101-resnet50"
PY = sys.executable


def _server_processes(data: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(data) in cmd and ("postgres" in cmd or "mlflow" in cmd):
            found.append(p)
    return found


def _data_folder() -> Path:
    """A folder PostgreSQL's unprivileged user can reach (pytest's own temporary folders are
    private to root, mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="food101-team-"))
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def server():
    folder = _data_folder()
    data = folder / "data"
    try:
        state = team.start(data, port=free_port())
        yield state
    finally:
        team.stop(data)
        left = _server_processes(data)
        shutil.rmtree(folder, ignore_errors=True)
        assert left == [], "a server process was left behind"


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_data_folder_nobody_can_reach_is_explained(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root hands PostgreSQL to another user")
    with pytest.raises(team.TeamServerError, match="chmod o\\+x"):
        team.start(tmp_path / "data", port=free_port())  # pytest's folders are mode 0700


def test_the_server_starts_once_survives_a_restart_and_stops_cleanly(server):
    data = Path(server["data"])
    same = {k: v for k, v in server.items() if k != "start_seconds"}
    assert team.start(data, port=server["port"]) == same  # already running: the same
    client = mlflow.MlflowClient(server["uri"], server["uri"])
    exp = client.create_experiment("survives")
    assert team.stop(data) and _server_processes(data) == []
    again = team.start(data, port=server["port"])
    assert again["uri"] == server["uri"]
    server.update(again)  # new pids, for the other tests and the final stop
    client = mlflow.MlflowClient(server["uri"], server["uri"])
    assert client.get_experiment_by_name("survives").experiment_id == exp


def _race_worker(uri: str, folder: str, model_uri: str, accuracy: float, barrier,
                 results) -> None:
    """One gate in its own working folder (so no local lock file is shared)."""
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        from pipeline.runs import registry

        decide = registry.decide

        def paused(*args):  # read champion ... pause ... write: the gates really overlap
            time.sleep(0.7)
            return decide(*args)

        registry.decide = paused  # this process only (spawned)
        version = registry.register(model_uri, "race", {
            "test_accuracy": f"{accuracy:.6f}", "test_manifest_sha256": "m" * 64})
        barrier.wait(120)
        decision = registry.gate("race", version, accuracy, "m" * 64, 0.0, _never)
        results.put({"version": version, "accuracy": accuracy, "decision": decision.as_dict()})
    except BaseException:
        results.put({"error": traceback.format_exc()})
        barrier.abort()


def _never(uri: str) -> float:
    raise AssertionError("the champion was measured on this manifest")


def test_gates_from_processes_that_share_only_the_server(server, tmp_path, monkeypatch):
    """N gates with a pause between reading the champion and writing: exactly one champion,
    the best (ties: the lower version), previous-champion right, every decision recorded."""
    from pipeline.runs import registry, store

    use_store(monkeypatch, server["uri"])
    model_uri = log_echo_model("race")
    v1 = registry.register(model_uri, "race", {"test_accuracy": "0.500000",
                                               "test_manifest_sha256": "m" * 64})
    registry.gate("race", v1, 0.5, "m" * 64, 0.0, _never)
    accuracies = [0.6, 0.8, 0.7, 0.8]  # two equal bests: the lower version must win
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(accuracies)), ctx.Queue()
    procs = []
    for i, acc in enumerate(accuracies):
        folder = tmp_path / f"clone{i}"
        folder.mkdir()
        procs.append(ctx.Process(target=_race_worker, args=(
            server["uri"], str(folder), model_uri, acc, barrier, results)))
    for p in procs:
        p.start()
    got = []
    try:
        for _ in procs:
            got.append(results.get(timeout=300))
    except queue.Empty:
        pytest.fail(f"gates did not finish: {got}")
    finally:
        for p in procs:
            p.join(60)
    assert not [g for g in got if "error" in g], got
    c = store.client()
    aliases = {k: str(v) for k, v in c.get_registered_model("race").aliases.items()}
    acc = {g["version"]: g["accuracy"] for g in got} | {v1: 0.5}
    best = max(acc.values())
    champion = str(min(int(v) for v, a in acc.items() if a == best))
    assert aliases["champion"] == champion
    decisions = {g["version"]: g["decision"] for g in got}
    assert decisions[champion]["promoted"]
    assert aliases["previous-champion"] == decisions[champion]["champion_version"]
    for version in acc:  # every decision recorded on its version
        assert c.get_model_version("race", version).tags["promotion"] in ("promoted",
                                                                          "rejected")
    promoted = sorted((g for g in got if g["decision"]["promoted"]),
                      key=lambda g: (g["accuracy"], -int(g["version"])))
    chain = v1  # the promotions happened one after the other: each saw the previous one
    for g in promoted:
        assert g["decision"]["champion_version"] == chain, got
        chain = g["version"]
    assert not c.search_registered_models("name = 'race.promotion-lock'")  # released

    # a champion chosen by hand is not undone by a gate that does not beat it
    worst = min(acc, key=acc.get)
    registry.promote("race", worst)
    lower = registry.register(model_uri, "race", {"test_accuracy": "0.400000",
                                                  "test_manifest_sha256": "m" * 64})
    assert not registry.gate("race", lower, 0.4, "m" * 64, 0.0, _never).promoted
    assert str(c.get_registered_model("race").aliases["champion"]) == worst


def test_an_expired_lock_is_broken_once_and_a_live_one_waits(server, monkeypatch):
    from pipeline.runs import lock as promotion
    from pipeline.runs import store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
    c = store.client()
    lock = "stale" + promotion.LOCK_SUFFIX
    c.create_registered_model(lock, tags={"token": "dead", "holder": "gone:1",
                                          "expires_at": f"{time.time() - 1:.3f}"})
    with promotion.server_lock("stale"):
        assert c.get_registered_model(lock).tags["token"] != "dead"  # ours now
    assert not c.search_registered_models(f"name = '{lock}'")
    assert not c.search_registered_models("name LIKE 'stale.promotion-lock.break-%'")
    monkeypatch.setattr(promotion, "LOCK_WAIT_SECONDS", 1.0)
    c.create_registered_model(lock, tags={"token": "alive", "holder": "busy:2",
                                          "expires_at": f"{time.time() + 600:.3f}"})
    with pytest.raises(promotion.LockError, match="still held .held by busy:2"):
        with promotion.server_lock("stale"):
            pass
    assert c.get_registered_model(lock).tags["token"] == "alive"  # not broken


class _Records(logging.Handler):
    """The messages a worker process logs, for the test to read."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _slow_gate_worker(uri: str, folder: str, version: str, accuracy: float, ttl: float,
                      started, release, results) -> None:
    """One gate in its own working folder with a lock expiry of ``ttl`` seconds. With
    ``release`` its re-score of the champion is slow: it waits for ``release`` and then lasts
    past the expiry (the test's hook, injected here)."""
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    records = _Records()
    logging.getLogger("pipeline").addHandler(records)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    try:
        from pipeline.runs import lock, registry

        lock.LOCK_TTL_SECONDS = ttl

        def rescore(model_uri: str) -> float:
            started.set()
            if release is not None:
                assert release.wait(120), "never released"
                time.sleep(ttl * 1.5)  # a re-score longer than the lock's expiry
            return 0.5

        decision = registry.gate("slow", version, accuracy, "b" * 64, 0.0, rescore)
        results.put({"version": version, "decision": decision.as_dict(),
                     "log": records.lines})
    except BaseException:
        results.put({"version": version, "error": traceback.format_exc(),
                     "log": records.lines})


def test_a_slow_re_score_never_decides_under_a_lost_lock(server, tmp_path, monkeypatch):
    """Two gates against one server, the lock's expiry 4 s. A re-scores the champion (tested
    on another manifest) for longer than that; B gates meanwhile and promotes a better model.
    No live lock is broken, and A, which scored v1, decides against B's v3, not v1."""
    use_store(monkeypatch, server["uri"])
    from pipeline.runs import registry

    model_uri = log_echo_model("slow")
    versions = {}
    for acc, manifest in ((0.5, "a"), (0.6, "b"), (0.7, "b")):
        versions[acc] = registry.register(model_uri, "slow", {
            "test_accuracy": f"{acc:.6f}", "test_manifest_sha256": manifest * 64})
    registry.gate("slow", versions[0.5], 0.5, "a" * 64, 0.0, _never)  # v1: champion on "a"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    a_started, b_started, release = ctx.Event(), ctx.Event(), ctx.Event()
    procs = {}
    for name, acc, started, gate_release in (("a", 0.6, a_started, release),
                                             ("b", 0.7, b_started, None)):
        folder = tmp_path / name
        folder.mkdir()
        procs[name] = ctx.Process(target=_slow_gate_worker, args=(
            server["uri"], str(folder), versions[acc], acc, 4.0, started, gate_release,
            results))
    got = {}
    try:
        procs["a"].start()
        assert a_started.wait(120), "gate A never started re-scoring"
        procs["b"].start()  # while A re-scores v1
        got["b"] = results.get(timeout=180)
        release.set()
        got["a"] = results.get(timeout=180)
    finally:
        release.set()
        for p in procs.values():
            p.join(60)
    assert not [g for g in got.values() if "error" in g], got
    lines = got["a"]["log"] + got["b"]["log"]
    assert not [line for line in lines if "breaking the promotion lock" in line], lines
    assert got["b"]["decision"]["promoted"] and got["b"]["version"] == versions[0.7]
    a = got["a"]["decision"]
    assert not a["promoted"] and a["champion_version"] == versions[0.7], a
    c = mlflow.MlflowClient(server["uri"], server["uri"])
    aliases = {k: str(v) for k, v in c.get_registered_model("slow").aliases.items()}
    assert aliases["champion"] == versions[0.7]
    assert aliases["previous-champion"] == versions[0.5]


def _project(root: Path, name: str, uri: str, lr: float) -> tuple[Path, dict]:
    repo = root / name
    env = make_project(repo, {"train": {"lr": lr}})
    env["MLFLOW_TRACKING_URI"] = uri
    return repo, env


def test_two_clones_at_once_then_a_fresh_clone_from_the_dvc_remote(server, tmp_path):
    uri = server["uri"]
    (a, env_a), (b, env_b) = (_project(tmp_path, "a", uri, 0.003),
                              _project(tmp_path, "b", uri, 0.01))
    procs = [subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for repo, env in ((a, env_a), (b, env_b))]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    c = mlflow.MlflowClient(uri, uri)
    versions = c.search_model_versions(f"name='{NAME}'")
    assert len(versions) >= 2
    acc = {str(v.version): float(v.tags["test_accuracy"]) for v in versions}
    best = max(acc.values())
    aliases = {k: str(v) for k, v in c.get_registered_model(NAME).aliases.items()}
    assert aliases["champion"] == str(min(int(v) for v, x in acc.items() if x == best))
    assert all(v.tags.get("promotion") for v in versions)
    status, body = _get(f"{uri}/api/2.0/mlflow/registered-models/alias?name={NAME}"
                        "&alias=champion")
    assert status == 200 and json.loads(body)["model_version"]["version"] == aliases["champion"]
    for repo in (a, b):  # nothing local: no store, artifacts went through the server
        assert not (repo / "mlruns").exists()
        assert (repo / ".cache" / "registry.lock").exists()
    assert list((Path(server["data"]) / "artifacts").rglob("weights.pt"))

    # the DVC remote: both push their run-cache; a fresh clone of a reproduces without work
    remote = tmp_path / "remote"
    for repo, env in ((a, env_a), (b, env_b)):
        sh(repo, "git", "add", "-A", env=env)
        sh(repo, "git", "commit", "-qm", "run", env=env)
        sh(repo, PY, "-m", "pipeline.team", "remote", str(remote), env=env)
        sh(repo, "dvc", "push", "--run-cache", env=env)
    fresh = tmp_path / "fresh"
    sh(tmp_path, "git", "clone", "-q", str(a), str(fresh), env=env_a)
    sh(fresh, PY, "-m", "pipeline.team", "remote", str(remote), env=env_a)
    sh(fresh, "dvc", "pull", "--run-cache", env=env_a)
    out = sh(fresh, "dvc", "repro", env=env_a)
    assert ran_stages(out.stdout + out.stderr) == {"champion"}  # the registry lookup only
    # what b ran: restored from the run-cache (--pull: DVC fetches the run-cache's data on use)
    out = sh(fresh, "dvc", "exp", "run", "--pull", "-S", "train.lr=0.01", env=env_a)
    text = out.stdout + out.stderr
    assert "Stage 'train' is cached - skipping run" in text, text[-3000:]
    assert "train" not in ran_stages(text)

    # a clone with a store of its own (no MLFLOW_TRACKING_URI): the pulled results name a run
    # that store does not have. No dead end: the message names the server and two ways out.
    own = tmp_path / "own-store"
    env_own = {k: v for k, v in env_a.items() if k != "MLFLOW_TRACKING_URI"}
    sh(tmp_path, "git", "clone", "-q", str(a), str(own), env=env_own)
    sh(own, PY, "-m", "pipeline.team", "remote", str(remote), env=env_own)
    sh(own, "dvc", "pull", "--run-cache", env=env_own)
    out = sh(own, "dvc", "repro", env=env_own, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert f"made with {uri}" in text and "MLFLOW_TRACKING_URI" in text, text[-3000:]
    assert "`dvc repro -f --downstream train`" in text, text[-3000:]
    sh(own, "dvc", "repro", env=env_own | {"MLFLOW_TRACKING_URI": uri})  # way 1: that store
    out = sh(own, "dvc", "repro", "-f", "--downstream", "train", env=env_own)  # way 2: here
    assert {"train", "evaluate", "champion", "predict"} <= ran_stages(out.stdout + out.stderr)
    here = project_client(own)  # its registry named: no process-wide default in the way
    assert str(here.get_registered_model(NAME).aliases["champion"]) == "1"
    sh(own, "dvc", "repro", env=env_own)  # and from now on, plain `dvc repro`


@pytest.fixture()
def auth_server():
    folder = _data_folder()
    data = folder / "data"
    try:
        yield team.start(data, port=free_port(), auth=True)
    finally:
        team.stop(data)
        left = _server_processes(data)
        shutil.rmtree(folder, ignore_errors=True)
        assert left == []


@contextlib.contextmanager
def _as(user: str, password: str):
    """MLflow clients in this process authenticate as ``user`` inside the block."""
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("MLFLOW_TRACKING_USERNAME", user)
        mp_.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


def test_basic_auth_two_users_run_and_gate(auth_server, tmp_path):
    from mlflow.server import get_app_client

    uri, data = auth_server["uri"], Path(auth_server["data"])
    password_file = data / "auth" / "admin_password"
    for private in ("admin_password", "secret_key", "basic_auth.ini", "basic_auth.db"):
        assert oct((data / "auth" / private).stat().st_mode & 0o777) == "0o600", private
    admin = ("admin", password_file.read_text().strip())
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(search)[0] == 401  # unauthenticated: refused
    assert _get(search, admin)[0] == 200
    users = {"ana": "ana-" + os.urandom(6).hex(), "ben": "ben-" + os.urandom(6).hex()}
    with _as(*admin):
        for user, password in users.items():
            get_app_client("basic-auth", tracking_uri=uri).create_user(user, password)

    repo, env = _project(tmp_path, "clone", uri, 0.003)
    out = sh(repo, "dvc", "repro", env={**env, "MLFLOW_TRACKING_USERNAME": "ana",
                                        "MLFLOW_TRACKING_PASSWORD": users["ana"]})
    # ana created the experiment and the registered model (MANAGE on both): ben may edit
    with _as("ana", users["ana"]):
        exp = mlflow.MlflowClient(uri, uri).get_experiment_by_name("food101").experiment_id
        grants = get_app_client("basic-auth", tracking_uri=uri)
        grants.grant_user_permission("ben", "experiment", exp, "EDIT")
        grants.grant_user_permission("ben", "registered_model", NAME, "EDIT")
    out2 = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.02", env={
        **env, "MLFLOW_TRACKING_USERNAME": "ben", "MLFLOW_TRACKING_PASSWORD": users["ben"]})
    assert {"train", "evaluate", "champion", "predict"} <= ran_stages(out2.stdout + out2.stderr)
    assert _get(f"{uri}/api/2.0/mlflow/registered-models/alias?name={NAME}&alias=champion",
                admin)[0] == 200
    with _as(*admin):
        c = mlflow.MlflowClient(uri, uri)
        versions = c.search_model_versions(f"name='{NAME}'")
        runs = c.search_runs([exp])
    assert len(versions) == 2 and all(v.tags.get("promotion") for v in versions)
    # credentials never land in params, tags, logs or the repository
    secrets_ = [users["ana"], users["ben"], admin[1]]
    for run in runs:
        blob = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert not any(secret in blob for secret in secrets_)
    logs = out.stdout + out.stderr + out2.stdout + out2.stderr
    assert not any(secret in logs for secret in secrets_)
    tracked = subprocess.run(["git", "grep", "-I", "-l", "-e", users["ana"], "-e",
                              users["ben"]], cwd=repo, capture_output=True, text=True)
    assert tracked.stdout == ""


def test_training_metrics_ride_out_a_server_restart(server, monkeypatch, caplog):
    """`make server-stop`, then `make server`, while a training run logs: the loop is not held
    up, nothing is lost. Down past the outage window: an error naming the store."""
    data = Path(server["data"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # straight to the pipeline's
    run_id = store.client().create_run(tracking.ensure_experiment("restart")).info.run_id

    def restart():
        server.update(team.start(data, port=server["port"]))

    caplog.set_level(logging.WARNING, logger="pipeline.runs.store")
    try:
        with tracking.metric_sender(run_id) as sender:
            sender.log({"train_step_loss": 1.0}, 0)
            assert team.stop(data)
            for step in range(1, 20):  # the loop goes on while the server is down
                sender.log({"train_step_loss": 1.0 / (step + 1)}, step)
            poll(lambda: "unreachable during log metrics" in caplog.text, 60,
                 "the sender waiting for the server")
            restart()
        steps = [m.step for m in store.client().get_metric_history(run_id, "train_step_loss")]
        assert sorted(steps) == list(range(20))

        monkeypatch.setenv(store.OUTAGE_ENV, "3")
        with pytest.raises(store.StoreError) as err:
            with tracking.metric_sender(run_id) as sender:
                assert team.stop(data)
                sender.log({"train_step_loss": 0.01}, 20)
        assert f"{server['uri']}: log metrics failed" in str(err.value)
        assert "did not answer for" in str(err.value)
    finally:
        if not _server_processes(data):
            restart()


def test_runuser_is_found_on_a_minimal_path(monkeypatch):
    """`env -i` or cron leave /usr/sbin off PATH; as root the server still starts."""
    if os.geteuid() != 0:
        pytest.skip("only root hands PostgreSQL to another user")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    folder = _data_folder()  # where nobody can reach the binary, wherever the venv is
    try:
        cmd = team._as_postgres_user([team._pg_bin("postgres", folder), "--version"])
        assert Path(cmd[0]).name == "runuser" and Path(cmd[0]).is_file()
        assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_postgres_runs_from_a_copy_where_nobody_cannot_reach_the_venv(tmp_path, monkeypatch):
    """A clone under a folder of mode 0700 (root's home, `mktemp -d`): `nobody` cannot run
    the venv's PostgreSQL, so it runs a copy in the data folder, which initdb works from."""
    if os.geteuid() != 0:
        pytest.skip("only root hands PostgreSQL to another user")
    site = tmp_path / "site-packages"  # pytest's folders are mode 0700
    hidden = site / "pgserver" / "pginstall"
    shutil.copytree(team._pg_install(), hidden, symlinks=True,
                    ignore=shutil.ignore_patterns("include"))
    libs = team._pg_install().parent.parent / "pgserver.libs"  # the wheel's bundled libraries
    if libs.is_dir():
        shutil.copytree(libs, site / "pgserver.libs", symlinks=True)
    monkeypatch.setattr(team, "_pg_install", lambda: hidden)
    folder = _data_folder()
    try:
        as_is = team._as_postgres_user([team._pg_bin("postgres"), "--version"])
        assert subprocess.run(as_is, capture_output=True).returncode != 0  # Permission denied
        initdb = team._pg_bin("initdb", folder)
        assert initdb.startswith(str(folder / "pginstall")) and Path(initdb).name == "initdb"
        stamp = (folder / "pginstall" / ".copied-from").read_text()
        assert team._pg_bin("pg_ctl", folder).startswith(str(folder / "pginstall"))
        assert (folder / "pginstall" / ".copied-from").read_text() == stamp  # not copied again
        pgdata = folder / "postgres"
        pgdata.mkdir()
        import pwd

        nobody = pwd.getpwnam(team.UNPRIVILEGED)
        os.chown(pgdata, nobody.pw_uid, nobody.pw_gid)
        init = subprocess.run(team._as_postgres_user([initdb, "-D", str(pgdata), "-U",
                                                      "postgres", "--no-instructions"]),
                              capture_output=True, text=True)
        assert init.returncode == 0, init.stderr  # it found its share files beside it
        assert (pgdata / "PG_VERSION").is_file()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
