"""The registry: registering versions, the promotion gate, aliases, rollback and clear errors;
store errors that are never read as an absence, and a stop that waits for the decision.

Versions are registered from a trivial MLflow pyfunc model logged once per test (no torch
model), so these tests are about the registry logic against a real SQLite MLflow store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback

import mlflow
import pytest
from helpers import log_echo_model
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from pipeline.runs import lock as lock_module
from pipeline.runs import registry, store
from pipeline.runs.registry import ModelRef, RegistryError
from pipeline.runs.store import StoreError

NAME = "registry-test-model"
MANIFEST = "a" * 64
OTHER_MANIFEST = "b" * 64
BARRIER_TIMEOUT = 120  # seconds; a child that never arrives breaks the barrier instead


# -- a fresh store per test, without paying for the schema migrations every time ----------------

@pytest.fixture()
def store_uri(mlflow_store) -> str:
    """conftest's ``mlflow_store``: a fresh store for every test."""
    return mlflow_store


@pytest.fixture()
def model_uri(store_uri) -> str:
    """One logged pyfunc model in the test's store; every version registers it."""
    return log_echo_model("registry-tests")


def new_version(uri: str, accuracy: float, manifest: str = MANIFEST, name: str = NAME) -> str:
    return registry.register(uri, name, {"test_accuracy": f"{accuracy:.6f}",
                                         "test_macro_f1": f"{accuracy / 2:.6f}",
                                         "test_manifest_sha256": manifest})


def never_called(uri: str) -> float:
    raise AssertionError(f"evaluate() must not be called (got {uri})")


def gate(version: str, accuracy: float, *, manifest: str = MANIFEST, min_delta: float = 0.0,
         evaluate=never_called, name: str = NAME) -> dict:
    return registry.gate(name, version, accuracy, manifest, min_delta, evaluate).as_dict()


def aliases() -> dict[str, str]:
    """alias -> version of NAME, read from MLflow itself."""
    return {k: str(v) for k, v in store.client().get_registered_model(NAME).aliases.items()}


def tags(version: str) -> dict[str, str]:
    return store.client().get_model_version(NAME, version).tags


# -- register ---------------------------------------------------------------------------------

def test_register_returns_version_with_tags_and_challenger_alias(model_uri):
    v1 = new_version(model_uri, 0.5)
    v2 = new_version(model_uri, 0.6)
    assert (v1, v2) == ("1", "2")
    assert isinstance(v1, str)
    assert tags(v1)["test_accuracy"] == "0.500000"
    assert tags(v2)["test_manifest_sha256"] == MANIFEST
    assert aliases() == {"challenger": "2"}  # the newest; no champion until the gate runs
    assert store.client().get_model_version(NAME, v1).source == model_uri


# -- the gate ---------------------------------------------------------------------------------

def test_gate_promotes_first_then_better_and_records_decisions(model_uri):
    v1 = new_version(model_uri, 0.5)
    d1 = gate(v1, 0.5)
    assert d1["promoted"] is True
    assert d1["reason"] == "no champion yet"
    assert d1["champion_version"] is None
    assert d1["version"] == v1 and d1["model_name"] == NAME
    dt.datetime.fromisoformat(d1["decided_at"])
    assert aliases()["champion"] == v1
    assert "previous-champion" not in aliases()
    assert tags(v1)["promotion"] == "promoted"
    assert tags(v1)["promotion_reason"] == "no champion yet"

    v2 = new_version(model_uri, 0.75)
    d2 = gate(v2, 0.75)
    assert d2["promoted"] is True
    assert d2["champion_version"] == v1
    assert d2["champion_test_accuracy"] == pytest.approx(0.5)
    assert "beats" in d2["reason"] and "does not beat" not in d2["reason"]
    assert aliases() == {"champion": v2, "previous-champion": v1, "challenger": v2}
    assert tags(v2)["promotion"] == "promoted"
    assert tags(v2)["promotion_reason"] == d2["reason"]


def test_gate_rejects_worse_and_equal_and_keeps_champion(model_uri):
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)

    v2 = new_version(model_uri, 0.25)
    worse = gate(v2, 0.25)
    assert worse["promoted"] is False
    assert "does not beat" in worse["reason"]
    assert worse["champion_version"] == v1
    assert tags(v2)["promotion"] == "rejected"
    assert tags(v2)["promotion_reason"] == worse["reason"]

    v3 = new_version(model_uri, 0.5)
    equal = gate(v3, 0.5)  # must be strictly better
    assert equal["promoted"] is False
    assert tags(v3)["promotion"] == "rejected"

    assert aliases()["champion"] == v1
    assert "previous-champion" not in aliases()


def test_gate_min_delta_is_a_strict_margin(model_uri):
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5, min_delta=0.25)
    # 0.5 + 0.25 == 0.75 exactly in binary floating point: not "more than" the margin
    v2 = new_version(model_uri, 0.75)
    at_margin = gate(v2, 0.75, min_delta=0.25)
    assert at_margin["promoted"] is False
    assert at_margin["min_delta"] == 0.25
    assert "min_delta 0.25" in at_margin["reason"]
    v3 = new_version(model_uri, 0.7)
    assert gate(v3, 0.7, min_delta=0.25)["promoted"] is False  # better, but within the margin
    v4 = new_version(model_uri, 0.76)
    above = gate(v4, 0.76, min_delta=0.25)
    assert above["promoted"] is True
    assert aliases()["champion"] == v4
    assert aliases()["previous-champion"] == v1
    assert [tags(v)["promotion"] for v in (v1, v2, v3, v4)] == [
        "promoted", "rejected", "rejected", "promoted"]


def test_gate_refuses_an_equal_accuracy_that_is_not_a_round_number(model_uri):
    # 100 of 300 right, twice: the same accuracy, 1/3, for champion and challenger; the
    # champion's is stored as the tag "0.333333" (as evaluate_and_log stores it)
    acc = 100 / 300
    v1 = new_version(model_uri, acc)
    gate(v1, acc)
    v2 = new_version(model_uri, acc)
    d = gate(v2, acc)
    assert d["promoted"] is False, d["reason"]
    assert aliases()["champion"] == v1


def test_gate_on_the_champion_itself_keeps_it(model_uri):
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)
    again = gate(v1, 0.1)
    assert again["promoted"] is True
    assert again["reason"] == "already champion"
    assert aliases()["champion"] == v1
    assert "previous-champion" not in aliases()  # never its own previous champion


class RecordingEvaluate:
    def __init__(self, value: float):
        self.value = value
        self.calls: list[str] = []

    def __call__(self, uri: str) -> float:
        self.calls.append(uri)
        return self.value


def test_gate_re_evaluates_champion_measured_on_another_manifest(model_uri):
    v1 = new_version(model_uri, 0.9, manifest=MANIFEST)
    gate(v1, 0.9, manifest=MANIFEST)

    # the challenger was tested on another manifest: the champion's recorded 0.9 does not
    # count; it is re-measured (0.5) on the challenger's manifest
    v2 = new_version(model_uri, 0.6, manifest=OTHER_MANIFEST)
    evaluate = RecordingEvaluate(0.5)
    d = gate(v2, 0.6, manifest=OTHER_MANIFEST, evaluate=evaluate)
    assert evaluate.calls == [f"models:/{NAME}/{v1}"]
    assert d["champion_test_accuracy"] == pytest.approx(0.5)
    assert d["promoted"] is True
    assert aliases()["champion"] == v2
    # the re-measurement is kept on the old champion, keyed by the manifest
    kept = {k: v for k, v in tags(v1).items()
            if k.startswith("test_accuracy") and OTHER_MANIFEST[:12] in k}
    assert list(kept.values()) == ["0.500000"]

    # v2 is champion and was tested on OTHER_MANIFEST: a challenger on it compares directly
    v3 = new_version(model_uri, 0.55, manifest=OTHER_MANIFEST)
    evaluate3 = RecordingEvaluate(0.0)
    d3 = gate(v3, 0.55, manifest=OTHER_MANIFEST, evaluate=evaluate3)
    assert evaluate3.calls == []
    assert d3["promoted"] is False
    assert d3["champion_test_accuracy"] == pytest.approx(0.6)


def test_gate_reuses_a_stored_re_evaluation(model_uri):
    v1 = new_version(model_uri, 0.5, manifest=MANIFEST)
    gate(v1, 0.5, manifest=MANIFEST)

    v2 = new_version(model_uri, 0.6, manifest=OTHER_MANIFEST)
    first = RecordingEvaluate(0.8)  # champion is better on the new manifest
    d2 = gate(v2, 0.6, manifest=OTHER_MANIFEST, evaluate=first)
    assert first.calls == [f"models:/{NAME}/{v1}"]
    assert d2["promoted"] is False
    assert aliases()["champion"] == v1

    v3 = new_version(model_uri, 0.85, manifest=OTHER_MANIFEST)
    second = RecordingEvaluate(0.0)  # would wrongly promote anything if it were called
    d3 = gate(v3, 0.85, manifest=OTHER_MANIFEST, evaluate=second)
    assert second.calls == []  # the stored test_accuracy@<manifest> is used
    assert d3["champion_test_accuracy"] == pytest.approx(0.8)
    assert d3["promoted"] is True


def test_gate_same_manifest_never_calls_evaluate(model_uri):
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)
    v2 = new_version(model_uri, 0.4)
    evaluate = RecordingEvaluate(0.0)
    d = gate(v2, 0.4, evaluate=evaluate)
    assert evaluate.calls == []
    assert d["promoted"] is False
    assert d["champion_test_accuracy"] == pytest.approx(0.5)


# -- concurrent gates -------------------------------------------------------------------------

def _gate_worker(uri: str, model_uri: str, accuracies: list[float], index: int,
                 barrier, results) -> None:
    """Child process: per round, register a version, then gate it together with the others."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        from pipeline.runs import registry as reg

        for rnd, acc in enumerate(accuracies):
            barrier.wait(BARRIER_TIMEOUT)  # round starts
            version = new_version(model_uri, acc)
            barrier.wait(BARRIER_TIMEOUT)  # everyone registered: gate at the same moment
            decision = reg.gate(NAME, version, acc, MANIFEST, 0.0, never_called).as_dict()
            results.put({"round": rnd, "worker": index, "version": version, "accuracy": acc,
                         "decision": decision})
            barrier.wait(BARRIER_TIMEOUT)  # round done: the parent looks at the registry
    except BaseException:
        results.put({"worker": index, "error": traceback.format_exc()})
        barrier.abort()


def _drain(results, n: int, timeout: float) -> list[dict]:
    out = []
    for _ in range(n):
        try:
            out.append(results.get(timeout=timeout))
        except queue.Empty:
            break
    return out


@pytest.mark.slow  # three processes; the tie and order rules are in test_faults.py
def test_concurrent_gates_leave_the_best_version_champion(model_uri, store_uri):
    # a weak champion exists; then each round, three processes gate at the same moment
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)
    rounds = [
        [0.6, 0.9, 0.7],  # all beat the champion: only the best may end up champion
        [0.85, 0.97, 0.93],  # one below the champion (0.9), two above
    ]
    per_worker = [[r[i] for r in rounds] for i in range(3)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(per_worker) + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_gate_worker, args=(store_uri, model_uri, accs, i, barrier, results))
        for i, accs in enumerate(per_worker)
    ]
    for p in procs:
        p.start()
    accuracy = {v1: 0.5}
    champion_acc = 0.5
    try:
        for rnd, accs in enumerate(rounds):
            try:
                for _ in range(3):  # start, gate together, done
                    barrier.wait(BARRIER_TIMEOUT)
            except threading.BrokenBarrierError:
                errors = [r.get("error") for r in _drain(results, len(procs), 5)]
                pytest.fail(f"a worker failed in round {rnd}:\n" + "\n".join(filter(None, errors)))
            got = _drain(results, len(procs), 30)
            assert len(got) == len(procs), got
            assert not [g for g in got if "error" in g], got
            assert sorted(g["accuracy"] for g in got) == sorted(accs)
            accuracy.update({g["version"]: g["accuracy"] for g in got})
            assert len(accuracy) == 1 + 3 * (rnd + 1)  # every registration got its own version

            current = aliases()
            best = max(accuracy, key=accuracy.get)
            assert current["champion"] == best, (current, accuracy)
            # the old champion is the runner-up among the promoted ones, never a better one
            assert accuracy[current["previous-champion"]] < accuracy[best]

            # The decisions must be explainable by gates running one after the other:
            # promoted ones form a chain, each compared with the one promoted just before.
            promoted = sorted((g for g in got if g["decision"]["promoted"]),
                              key=lambda g: g["accuracy"])
            assert promoted and promoted[-1]["version"] == best
            before = next(v for v, a in accuracy.items() if a == champion_acc)
            for g in promoted:
                assert g["decision"]["champion_version"] == before, (rnd, got)
                assert g["accuracy"] > g["decision"]["champion_test_accuracy"]
                before = g["version"]
            for g in got:
                d = g["decision"]
                if not d["promoted"]:
                    assert g["accuracy"] <= d["champion_test_accuracy"], g
                    assert tags(g["version"])["promotion"] == "rejected"
                else:
                    assert tags(g["version"])["promotion"] == "promoted"
            # no version with lower accuracy than a promoted one holds champion
            assert all(accuracy[current["champion"]] >= g["accuracy"] for g in promoted)
            champion_acc = accuracy[best]
    finally:
        barrier.abort()  # after a failed check, release workers waiting for the next round
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(5)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    # one champion alias (MLflow keeps one version per alias), on the best version
    assert aliases()["champion"] == max(accuracy, key=accuracy.get)
    assert len(store.client().search_model_versions(f"name='{NAME}'")) == len(accuracy)


# -- promote, rollback ------------------------------------------------------------------------

def test_rollback_restores_previous_champion_and_swaps(model_uri):
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)
    v2 = new_version(model_uri, 0.8)
    gate(v2, 0.8)
    assert aliases()["champion"] == v2

    out = registry.rollback(NAME)
    assert out["champion"] == v1 and out["previous_champion"] == v2
    assert aliases()["champion"] == v1
    assert aliases()["previous-champion"] == v2
    assert tags(v2)["promotion"] == "rolled back"
    assert registry.resolve(NAME, "champion").uri == f"models:/{NAME}/{v1}"  # pinned

    back = registry.rollback(NAME)  # the two swap again
    assert back["champion"] == v2 and back["previous_champion"] == v1
    assert aliases()["champion"] == v2
    assert aliases()["previous-champion"] == v1


def test_rollback_without_previous_champion_explains(model_uri):
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)
    with pytest.raises(RegistryError, match="nothing to roll back") as err:
        registry.rollback(NAME)
    assert "previous-champion" in str(err.value)
    assert aliases()["champion"] == v1  # unchanged


def test_promote_by_hand_and_missing_version(model_uri):
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)
    v2 = new_version(model_uri, 0.1)
    assert gate(v2, 0.1)["promoted"] is False

    out = registry.promote(NAME, 2)  # an int works as well as a string
    assert out == {"model_name": NAME, "champion": v2, "previous_champion": v1,
                   "decided_at": out["decided_at"]}
    assert aliases()["champion"] == v2
    assert aliases()["previous-champion"] == v1
    assert tags(v2)["promotion"] == "promoted by hand"

    with pytest.raises(RegistryError) as err:
        registry.promote(NAME, 99)
    msg = str(err.value)
    assert "no version 99" in msg
    assert "[1, 2]" in msg  # the versions that do exist
    assert aliases()["champion"] == v2  # unchanged


def test_resolve_without_champion_says_how_to_get_one(model_uri):
    new_version(model_uri, 0.5)  # registered (challenger) but never gated
    with pytest.raises(RegistryError) as err:
        registry.resolve(NAME, "champion")
    msg = str(err.value)
    assert "alias 'champion'" in msg
    assert "dvc repro" in msg and "promote" in msg
    with pytest.raises(RegistryError, match="alias 'staging'.*promote"):
        registry.resolve(NAME, "staging")
    with pytest.raises(RegistryError, match="no version 7; versions: \\[1\\]"):
        registry.resolve(NAME, "7")
    run_id = store.client().get_model_version(NAME, "1").run_id or ""
    assert registry.resolve(NAME, "challenger") == ModelRef(NAME, "challenger", "1", run_id)
    assert registry.resolve(NAME, "1").uri == f"models:/{NAME}/1"
    assert registry.resolve(NAME, "01").version == "1"
    file = registry.resolve(NAME, "challenger").champion_file()  # reports/champion.json
    assert (file.model_name, file.ref, file.version, file.run_id) == (
        NAME, "challenger", "1", run_id)


def test_unknown_model_says_registry_is_empty(store_uri):
    for call in (lambda: registry.resolve("nope", "champion"),
                 lambda: registry.resolve("nope", "3"),
                 lambda: registry.list_versions("nope"),
                 lambda: registry.promote("nope", 1),
                 lambda: registry.rollback("nope")):
        with pytest.raises(RegistryError) as err:
            call()
        msg = str(err.value)
        assert "'nope' does not exist" in msg
        assert "registry is empty" in msg
        assert store_uri in msg  # names the store that was looked at


def _three_versions(model_uri) -> None:
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)
    v2 = new_version(model_uri, 0.75)
    gate(v2, 0.75)
    new_version(model_uri, 0.25)  # registered, not gated


def test_list_versions_newest_first_with_metrics(model_uri):
    _three_versions(model_uri)
    rows = registry.list_versions(NAME)
    assert [r["version"] for r in rows] == [3, 2, 1]
    assert [r["test_accuracy"] for r in rows] == ["0.250000", "0.750000", "0.500000"]
    assert [r["test_macro_f1"] for r in rows] == ["0.125000", "0.375000", "0.250000"]
    assert [r["promotion"] for r in rows] == [None, "promoted", "promoted"]
    for r in rows:
        dt.datetime.fromisoformat(r["created"])
        assert isinstance(r["aliases"], list)


def test_list_versions_shows_aliases(model_uri):
    _three_versions(model_uri)
    assert aliases() == {"challenger": "3", "champion": "2", "previous-champion": "1"}
    rows = registry.list_versions(NAME)
    assert [r["aliases"] for r in rows] == [["challenger"], ["champion"], ["previous-champion"]]


# -- store errors are errors, and a stop waits for the decision --------------------------------


def _fail(code: str, message: str = "the store broke"):
    def fails(*args, **kwargs):
        raise MlflowException(message, error_code=getattr(databricks_pb2, code))

    return fails


@pytest.fixture()
def registered(model_uri):
    """v1 (champion, accuracy 0.5) and v2 (challenger, 0.9) of NAME."""
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)
    return model_uri, v1, new_version(model_uri, 0.9)


@pytest.mark.parametrize("code", ["INTERNAL_ERROR", "INVALID_PARAMETER_VALUE",
                                  "PERMISSION_DENIED"])
def test_a_failing_registry_read_is_not_read_as_no_champion(registered, code):
    """The old code turned any error into "no champion yet" and promoted."""
    _, _, v2 = registered
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(mlflow.MlflowClient, "get_registered_model", _fail(code))
        with pytest.raises(StoreError) as err:
            registry.gate(NAME, v2, 0.1, MANIFEST, 0.0, never_called)
        msg = str(err.value)
        assert store.tracking_uri() in msg and "read registered model" in msg
        assert code in msg
        with pytest.raises(StoreError):
            registry.resolve(NAME, "champion")
    assert aliases() == {"champion": "1", "challenger": "2"}  # nothing moved
    assert "promotion" not in tags(v2)


def test_an_alias_is_unset_only_when_absent_from_the_alias_list(registered, monkeypatch):
    # asking MLflow for an unset alias directly raises INVALID_PARAMETER_VALUE, like other
    # bad requests: the registry reads the alias list instead and never asks
    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias",
                        _fail("INVALID_PARAMETER_VALUE"))
    assert registry.alias_version(NAME, "previous-champion") is None
    assert str(registry.alias_version(NAME, "champion").version) == "1"


def test_only_an_existing_model_is_ignored_on_create(registered, monkeypatch):
    uri, _, _ = registered
    versions = len(store.client().search_model_versions(f"name='{NAME}'"))
    monkeypatch.setattr(mlflow.MlflowClient, "create_registered_model",
                        _fail("RESOURCE_ALREADY_EXISTS"))
    assert registry.register(uri, NAME, {"test_accuracy": "0.1"}) == str(versions + 1)
    monkeypatch.setattr(mlflow.MlflowClient, "create_registered_model",
                        _fail("INTERNAL_ERROR"))
    with pytest.raises(StoreError, match="create registered model"):
        registry.register(uri, NAME, {"test_accuracy": "0.2"})
    assert len(store.client().search_model_versions(f"name='{NAME}'")) == versions + 1


def test_a_stop_waits_for_the_decision_and_its_record(registered, monkeypatch):
    """SIGTERM in the middle of the gate's writes takes effect after the alias moved and the
    decision was recorded, never between them."""
    from pipeline import signals

    _, v1, v2 = registered
    signals.install()
    real = mlflow.MlflowClient.set_model_version_tag

    def tag_then_stop(self, *args, **kwargs):
        real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the critical section

    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", tag_then_stop)
    try:
        with pytest.raises(signals.Terminated):
            registry.gate(NAME, v2, 0.9, MANIFEST, 0.0, never_called)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert aliases()["champion"] == v2 and aliases()["previous-champion"] == v1
    assert tags(v2)["promotion"] == "promoted"


def test_a_reregistered_run_reuses_its_version(registered):
    """An evaluate killed after registering, run again: one version per run and model."""
    uri, _, _ = registered
    run_id = mlflow.search_runs(experiment_names=["registry-tests"],
                                output_format="list")[0].info.run_id
    first = registry.register(uri, NAME, {"run_id": run_id, "test_accuracy": "0.3"})
    again = registry.register(uri, NAME, {"run_id": run_id, "test_accuracy": "0.3"})
    assert first == again
    assert tags(first)["test_accuracy"] == "0.3"


def test_ties_go_to_the_lower_version_whatever_the_order(registered):
    uri, _, _ = registered
    v3, v4 = new_version(uri, 0.7), new_version(uri, 0.7)
    assert gate(v4, 0.7)["promoted"]  # first
    late = gate(v3, 0.7)
    assert late["promoted"] and "lower version wins" in late["reason"]
    assert aliases()["champion"] == v3
    assert not gate(v4, 0.7)["promoted"]


def test_the_rule_alone():
    assert registry.decide("1", 0.1, None, None, 0.0) == (True, "no champion yet")
    assert registry.decide("2", 0.1, "2", 0.9, 0.0) == (True, "already champion")
    assert registry.decide("3", 0.61, "2", 0.6, 0.0)[0]
    assert not registry.decide("3", 0.61, "2", 0.6, 0.01)[0]  # not by more than min_delta
    assert not registry.decide("3", 0.6, "2", 0.6, 0.0)[0]  # a tie: the lower version
    assert registry.decide("2", 0.6, "3", 0.6, 0.0)[0]


class _Lost(lock_module.Held):
    def check(self):
        raise lock_module.LockError("the promotion lock is no longer safely held")


def test_nothing_is_written_under_a_lost_lock(model_uri, monkeypatch):
    v1 = new_version(model_uri, 0.5)
    gate(v1, 0.5)
    v2 = new_version(model_uri, 0.9)

    @contextlib.contextmanager
    def lost(name):
        yield _Lost()

    monkeypatch.setattr(registry, "promotion_lock", lost)
    with pytest.raises(lock_module.LockError):
        gate(v2, 0.9)
    assert "promotion" not in tags(v2) and aliases()["champion"] == v1


def test_a_champion_replaced_while_it_was_scored_is_scored_before_deciding(model_uri,
                                                                          monkeypatch):
    """The re-score runs outside the lock; under it the champion is read again. Another gate
    promoted v2 meanwhile: v3 is decided against v2 (recorded on this manifest), not v1."""
    v1 = new_version(model_uri, 0.5, manifest=OTHER_MANIFEST)
    gate(v1, 0.5, manifest=OTHER_MANIFEST)
    v2, v3 = new_version(model_uri, 0.8), new_version(model_uri, 0.7)
    scored = []

    def rescore(uri):  # while v1 is scored, another gate promotes v2
        scored.append(uri)
        assert gate(v2, 0.8, evaluate=lambda u: 0.5)["promoted"]
        return 0.5

    decision = gate(v3, 0.7, evaluate=rescore)
    assert scored == [f"models:/{NAME}/{v1}"]
    assert not decision["promoted"] and decision["champion_version"] == v2
    assert aliases()["champion"] == v2
