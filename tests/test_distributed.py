"""DDP through PyTorch's own launcher, with Gloo on this CPU: the collectives, a dead worker,
a stopped launcher, and training that matches one process and logs one MLflow run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import ddp_workers
import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from helpers import REPO, make_tiny_data

from pipeline import distributed
from pipeline.distributed import WorkerFailed


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pids(out: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(out.glob("pid*"))]


def test_collectives_gather_and_sum_over_all_ranks(tmp_path):
    distributed.launch(ddp_workers.collectives, (str(tmp_path),), nproc=2, device_type="cpu",
                       threads=1, workdir=tmp_path / "launch")
    x = torch.arange(48, dtype=torch.float32).reshape(12, 4) ** 1.5
    bn = torch.nn.BatchNorm1d(4).train()  # one process, the whole batch
    with torch.no_grad():
        bn.weight.mul_(2.0)
    expected = bn(x).detach().numpy()
    torch.manual_seed(0)
    mask = torch.nn.Dropout(0.5).train()(torch.ones(12, 8)).numpy()
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            assert z["arr_0"].tolist() == [[0, 0, 0]]  # rank 0's one row
            assert z["arr_1"].tolist() == [[1, 1, 1], [1, 1, 1]]  # rank 1's two rows
            assert z["sums"].tolist() == [1.0, 3.0]
            assert z["empty_rows"].tolist() == [0, 2]
            assert int(z["threads"]) == 1 and int(z["world"]) == 2
            np.testing.assert_allclose(z["normed"], expected[rank::2], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(z["running_var"], bn.running_var.numpy(), rtol=1e-5)
            np.testing.assert_array_equal(z["masked"], mask[rank::2])


def test_a_killed_worker_fails_the_launch_and_leaves_no_process(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match="rank 1 .* was killed by SIGKILL"):
        distributed.launch(ddp_workers.kill_rank_one, (str(tmp_path),), nproc=2,
                           device_type="cpu", threads=1, workdir=tmp_path / "launch")
    assert time.monotonic() - t0 < 30  # rank 0, waiting in a collective, was stopped
    pids = _pids(tmp_path)
    assert len(pids) == 2 and not any(_alive(p) for p in pids)
    assert signal.getsignal(signal.SIGTERM) is not None  # the launcher's handlers are gone


@pytest.mark.slow
def test_a_user_error_in_a_worker_is_reported_with_its_message(tmp_path):
    with pytest.raises(WorkerFailed, match="rank 1 found a stale manifest"):
        distributed.launch(ddp_workers.user_error_on_rank_one, (str(tmp_path),), nproc=2,
                           device_type="cpu", threads=1, workdir=tmp_path / "launch")
    assert not any(_alive(p) for p in _pids(tmp_path))


# -- the train job with 2 Gloo processes (slow: workers import torch and MLflow) ---------------


def _train(data, store_tmp: Path, experiment: str, train: dict | None = None, **compute):
    from pipeline.jobs.train import TrainData, train_and_log
    from pipeline.runs.spec import RunSpec

    p = data.params
    p = dataclasses.replace(p, compute=dataclasses.replace(p.compute, **compute),
                            train=dataclasses.replace(p.train, **(train or {})))
    spec = RunSpec(experiment, f"nproc={p.compute.nproc}", {}, p.flat())
    return train_and_log(TrainData(data.root, data.classes, data.train, data.val), p.model,
                         p.train, p.data.image_size, spec, store_tmp / "features", p.compute)


def _runs(experiment: str) -> list:
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs([exp.experiment_id], output_format="list") if exp else []


@pytest.fixture(scope="module")
def ddp_data(learnable_demo, tmp_path_factory):
    """The learnable demo set: 360 images of 6 classes at 32 px, half of them validation."""
    return make_tiny_data(learnable_demo, tmp_path_factory.mktemp("ddp"),
                          data={"image_size": 32},
                          sample={"size": 360, "test_size": 60, "unlabeled_size": 0},
                          split={"val_fraction": 0.5},
                          train={"epochs": 4, "batch_size": 32, "log_every": 1})


@pytest.mark.slow
def test_ddp_matches_one_process_logs_one_run_and_its_model_runs_on_cpu(ddp_data, mlflow_store,
                                                                     tmp_path):
    one = _train(ddp_data, tmp_path, "one")
    two = _train(ddp_data, tmp_path, "two", nproc=2)
    # The same global batches, BatchNorm statistics and dropout masks as one process: the
    # runs differ by the order of floating-point sums only.
    acc1, acc2 = one.metrics["val_accuracy"], two.metrics["val_accuracy"]
    assert abs(acc1 - acc2) <= 0.02, (acc1, acc2)

    (run,) = _runs("two")  # exactly one run for the whole DDP training
    (run1,) = _runs("one")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["resolved.nproc"] == "2" and params["resolved.device"] == "cpu"
    assert params["resolved.torch_threads"] == str(max(1, distributed.cpu_cores() // 2))
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4]  # logged by rank 0, once per epoch
    assert history[-1].value == acc2
    losses = [client.get_metric_history(r.info.run_id, "train_step_loss") for r in (run1, run)]
    assert [m.step for m in losses[1]] == [m.step for m in losses[0]]  # 180 images / 32: 6
    assert len(losses[1]) == 4 * 6  # steps per epoch, the same global batches
    np.testing.assert_allclose([m.value for m in losses[1][:6]],
                               [m.value for m in losses[0][:6]], rtol=1e-4)

    # The model trained by DDP loads in a plain process and predicts on the CPU.
    model = mlflow.pyfunc.load_model(two.run.model_uri)
    test = ddp_data.test.frame
    out = model.predict(pd.DataFrame({"path": [str(ddp_data.root / p) for p in test["path"]]}))
    assert out["error"].isna().all() and set(out["label"]) <= set(ddp_data.classes)
    assert (out["label"] == test["label"].to_numpy()).mean() > 1.5 / len(ddp_data.classes)


def _spawned(parent: psutil.Process) -> list[psutil.Process]:
    """The launcher's worker processes (multiprocessing spawn children)."""
    out = []
    for child in parent.children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            continue
    return out


def _wait_for_workers(parent: psutil.Process, n: int, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = _spawned(parent)
        if len(workers) >= n:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"{n} workers did not start")


@pytest.mark.slow
def test_killing_one_rank_fails_the_run_cleanly(tiny_data, mlflow_store, tmp_path):
    killed: list[int] = []

    def kill_one():
        workers = _wait_for_workers(psutil.Process(), 2)
        time.sleep(4)  # in the middle of joining, extracting or training
        killed.append(workers[-1].pid)
        workers[-1].kill()

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    with pytest.raises(WorkerFailed, match=r"rank \d \(pid \d+\) was killed by SIGKILL"):
        _train(tiny_data, tmp_path, "killed", train={"epochs": 300}, nproc=2)
    killer.join()
    (run,) = _runs("killed")
    assert run.info.status == "FAILED"
    time.sleep(0.5)
    assert killed and not _spawned(psutil.Process())  # no worker left behind


STAGE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from pipeline import signals
    from pipeline.config import params_from_dict
    from pipeline.handoffs import Manifest
    from pipeline.jobs.train import TrainData, train_and_log
    from pipeline.runs.spec import RunSpec
    signals.install()
    cfg = json.loads(sys.argv[1])
    p = params_from_dict(cfg["params"])
    data = TrainData(Path(cfg["root"]), tuple(cfg["classes"]), Manifest.read(cfg["train"]),
                     Manifest.read(cfg["val"]))
    try:
        train_and_log(data, p.model, p.train, p.data.image_size,
                      RunSpec("stopped", "victim", {}, {}), None, p.compute)
    except KeyboardInterrupt as exc:
        sys.exit(signals.exit_code(exc))
""")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_stage_stops_every_worker(tiny_data, mlflow_store, signum):
    """SIGTERM: the workers are stopped and the run ends KILLED (exit 143). SIGKILL of the
    stage: the kernel kills the workers with it (the run is reaped by the next one)."""
    cfg = {"params": {"data": {"image_size": 32},
                      "train": {"epochs": 300, "batch_size": 16}, "compute": {"nproc": 2}},
           "root": str(tiny_data.root), "classes": list(tiny_data.classes),
           "train": str(tiny_data.paths["train"]), "val": str(tiny_data.paths["val"])}
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", STAGE, json.dumps(cfg)], cwd=REPO, env=env)
    try:
        workers = _wait_for_workers(psutil.Process(proc.pid), 2)
        time.sleep(4)
        proc.send_signal(signum)
        assert proc.wait(timeout=90) == (143 if signum == signal.SIGTERM else -9)
    finally:
        proc.kill()
    psutil.wait_procs(workers, timeout=10)
    assert not any(_alive(w.pid) for w in workers)
    if signum == signal.SIGTERM:
        (run,) = _runs("stopped")
        assert run.info.status == "KILLED"


@pytest.mark.slow
def test_the_stage_under_an_outside_torchrun_is_one_run_and_dvc_takes_it(tmp_path):
    """What several machines run (README: "Several GPUs and machines"), here with one:
    `torchrun ... -m stages.train` on each, rank 0 owns the run and writes the outputs;
    `dvc commit train` records them and `dvc repro` carries on from evaluate."""
    from helpers import make_project, project_client, ran_stages, sh

    repo = tmp_path / "repo"
    env = make_project(repo)
    sh(repo, "dvc", "repro", "split", env=env)
    sh(repo, sys.executable, "-m", "torch.distributed.run", "--standalone",
       "--nproc-per-node=2", "-m", "stages.train", env=env)
    client = project_client(repo)
    (run,) = client.search_runs([client.get_experiment_by_name("food101").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["resolved.nproc"] == "2"
    assert json.loads((repo / "reports" / "run.json").read_text())["run_id"] == run.info.run_id
    sh(repo, "dvc", "commit", "-f", "train", env=env)
    out = sh(repo, "dvc", "repro", env=env)
    assert ran_stages(out.stdout + out.stderr) == {"evaluate", "champion", "predict"}
