"""The promotion lock: a file beside a local store, and on a server the registered model
``<name>.promotion-lock`` (run here against a SQLite store's registry, which takes the same
requests): held by one pipeline, released, broken once when its holder expired."""

import time

import pytest

from pipeline.runs import lock, store
from pipeline.runs.lock import LockError


def test_the_lock_file_lives_beside_the_sqlite_store(mlflow_store):
    assert lock.lock_path() == store.sqlite_path(mlflow_store).parent / "registry.lock"
    with lock.promotion_lock("m"):
        assert lock.lock_path().exists()
    assert not store.client().search_registered_models("name = 'm.promotion-lock'")


def test_a_server_store_keeps_its_lock_file_out_of_mlruns(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5005")
    assert lock.lock_path() == tmp_path / ".cache" / "registry.lock"


def test_the_server_lock_is_a_registered_model_while_held(mlflow_store):
    c = store.client()
    with lock.server_lock("m"):
        held = c.get_registered_model("m" + lock.LOCK_SUFFIX).tags
        assert held["holder"] and held["token"] and float(held["expires_at"]) > time.time()
    assert not c.search_registered_models("name = 'm.promotion-lock'")  # released


def test_an_expired_lock_is_broken_once_and_a_live_one_is_not(mlflow_store, monkeypatch):
    c = store.client()
    name = "stale" + lock.LOCK_SUFFIX
    c.create_registered_model(name, tags={"token": "dead", "holder": "gone:1",
                                          "expires_at": f"{time.time() - 1:.3f}"})
    with lock.server_lock("stale"):
        assert c.get_registered_model(name).tags["token"] != "dead"  # ours now
    assert not c.search_registered_models(f"name = '{name}'")
    assert not c.search_registered_models("name LIKE 'stale.promotion-lock.break-%'")
    monkeypatch.setattr(lock, "LOCK_WAIT_SECONDS", 0.0)  # give up at the first refusal
    c.create_registered_model(name, tags={"token": "alive", "holder": "busy:2",
                                          "expires_at": f"{time.time() + 600:.3f}"})
    with pytest.raises(LockError, match="still held .held by busy:2"):
        with lock.server_lock("stale"):
            pass
    assert c.get_registered_model(name).tags["token"] == "alive"  # not broken


def test_a_write_needs_the_lock_still_ours_with_time_to_spare(monkeypatch):
    monkeypatch.setattr(lock, "client", lambda: None)
    held = lock.Held("m" + lock.LOCK_SUFFIX, "mine", time.time() + lock.LOCK_TTL_SECONDS)
    monkeypatch.setattr(lock, "_lock_tags", lambda c, name: {"token": "mine"})
    held.check()
    monkeypatch.setattr(lock, "_lock_tags", lambda c, name: {"token": "another gate's"})
    with pytest.raises(LockError, match="no longer safely held .it was broken or released"):
        held.check()
    monkeypatch.setattr(lock, "_lock_tags", lambda c, name: None)
    with pytest.raises(LockError, match="broken or released"):
        held.check()
    monkeypatch.setattr(lock, "_lock_tags", lambda c, name: {"token": "mine"})
    held.expires = time.time() + lock.LOCK_MARGIN * lock.LOCK_TTL_SECONDS / 2
    with pytest.raises(LockError, match="expires in"):
        held.check()
    lock.Held().check()  # a file lock on this machine cannot be lost


def test_the_expiry_is_a_setting_and_a_dead_holder_is_broken_after_it(mlflow_store,
                                                                      monkeypatch):
    assert lock.lock_ttl() == lock.LOCK_TTL_SECONDS
    monkeypatch.setenv(lock.LOCK_TTL_ENV, "30")
    c = store.client()
    with lock.server_lock("short") as held:
        tags = c.get_registered_model("short" + lock.LOCK_SUFFIX).tags
        assert 25 < float(tags["expires_at"]) - time.time() <= 30
        assert held.ttl == 30
        held.expires = time.time() + 30 * lock.LOCK_MARGIN - 1  # the margin is of 30 s
        with pytest.raises(LockError, match="expires in"):
            held.check()


@pytest.mark.parametrize("value", ["0", "-5", "ten", "nan"])
def test_a_wrong_expiry_is_refused_with_the_setting_named(monkeypatch, value):
    monkeypatch.setenv(lock.LOCK_TTL_ENV, value)
    with pytest.raises(LockError, match="FOOD101_LOCK_TTL_SECONDS=.*expected a number"):
        lock.lock_ttl()
