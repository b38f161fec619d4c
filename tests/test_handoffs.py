"""The typed hand-off files: written and read back whole, atomically, and refused with the
file's name and the fix when they have another shape."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import REPO

from pipeline import handoffs
from pipeline.handoffs import (
    ChampionRef,
    HandoffError,
    Manifest,
    Promotion,
    RunRef,
    SampleReport,
    SkippedFile,
    SourceInfo,
    UnlabeledKey,
)

REPORT = SampleReport(root="data/source", classes=("a", "b"), counts={"sample": 4, "test": 2},
                      per_class={"sample": {"a": 2, "b": 2}}, checked_images=7,
                      skipped_count=1, skipped=(SkippedFile("images/a/1.jpg", "train",
                                                            "not a readable image"),))
PROMOTION = Promotion(model_name="m", version="3", test_accuracy=0.5,
                      test_manifest_sha256="f" * 64, min_delta=0.0, champion_version=None,
                      champion_test_accuracy=None, decided_at="2026-11-29T12:00:00+00:00",
                      promoted=True, reason="no champion yet", run_id="r1")


@pytest.mark.parametrize("obj", [REPORT, PROMOTION, RunRef("r1", "baseline", "models:/m-1"),
                                 ChampionRef("m", "champion", "3", "r1"),
                                 SourceInfo("demo", ".", ("a", "b"), 10, 4, None, 0)])
def test_json_round_trip(tmp_path, obj):
    path = obj.write(tmp_path / "x.json")
    assert type(obj).read(path) == obj
    assert json.loads(path.read_text()) == obj.as_dict()


def test_default_paths_are_the_ones_dvc_tracks():
    outs = set()
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            outs.add(next(iter(out)) if isinstance(out, dict) else out)
    for path in (handoffs.SOURCE_DIR, handoffs.SAMPLE_MANIFEST, handoffs.TRAIN_MANIFEST,
                 handoffs.VAL_MANIFEST, handoffs.TEST_MANIFEST, handoffs.UNLABELED_KEY,
                 handoffs.UNLABELED_DIR, handoffs.SAMPLE_REPORT, handoffs.RUN_REF,
                 handoffs.PROMOTION, handoffs.CHAMPION, handoffs.PER_CLASS_REPORT,
                 handoffs.TRAIN_METRICS,
                 handoffs.EVALUATE_METRICS, handoffs.PREDICT_METRICS, handoffs.TRAIN_HISTORY,
                 handoffs.LEARNING_CURVES, handoffs.CONFUSION_CSV, handoffs.CONFUSION_PNG,
                 handoffs.PER_CLASS_ACCURACY_CSV, handoffs.PER_CLASS_ACCURACY_PNG,
                 handoffs.WORST_PREDICTIONS_PNG, handoffs.PREDICTIONS):
        assert path.as_posix() in outs, path
    assert SampleReport.default_path == handoffs.SAMPLE_REPORT
    assert RunRef.default_path == handoffs.RUN_REF
    assert Promotion.default_path == handoffs.PROMOTION


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"run_id": "r1", "model_uri": "models:/m-1"}', "run.run_name: missing"),
        ('{"run_id": "r1", "run_name": "b", "model_uri": 3}', "run.model_uri: got 3"),
        ('{"run_id": "r1", "run_name": "b", "model_uri": "u", "extra": 1}',
         "run.extra: unknown key"),
        ("[1, 2]", "expected a mapping"),
        ("{not json", "not JSON"),
    ],
)
def test_a_file_of_another_shape_names_the_file_and_the_fix(tmp_path, text, problem):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(HandoffError) as err:
        RunRef.read(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and problem in msg and "re-run `dvc repro`" in msg


def test_an_older_promotion_file_is_refused(tmp_path):
    old = PROMOTION.as_dict()
    del old["run_id"]  # as evaluate wrote it before it carried the run id
    (tmp_path / "promotion.json").write_text(json.dumps(old))
    with pytest.raises(HandoffError, match="promotion.run_id: missing"):
        Promotion.read(tmp_path / "promotion.json")


def test_a_missing_file_says_which_stage_writes_it(tmp_path):
    with pytest.raises(HandoffError, match="run `dvc repro train` first"):
        RunRef.read(tmp_path / "run.json")
    with pytest.raises(HandoffError, match="run `dvc repro sample` first"):
        Manifest.read(tmp_path / "test.csv")


def test_manifests_check_their_columns_and_carry_their_digest(tmp_path):
    frame = pd.DataFrame({"path": ["a/1.jpg"], "label": ["a"], "class_index": [0],
                          "sha256": ["0" * 64]})
    path = Manifest(frame).write(tmp_path / "m.csv")
    read = Manifest.read(path)
    pd.testing.assert_frame_equal(read.frame, frame)
    import hashlib

    assert read.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read.path == str(path)
    frame.drop(columns="sha256").to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(HandoffError, match=r"columns \['sha256'\] are missing"):
        Manifest.read(tmp_path / "old.csv")
    with pytest.raises(ValueError, match="lacks the columns"):
        UnlabeledKey(frame).write(tmp_path / "k.csv")


def test_sample_report_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HandoffError, match="does not exist"):
        REPORT.image_root()
    (tmp_path / "data" / "source").mkdir(parents=True)
    assert REPORT.image_root() == (tmp_path / "data" / "source").resolve()


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the old file whole and no temporary file behind."""
    target = RunRef("old", "old", "models:/m-0").write(tmp_path / "run.json")
    before = target.read_bytes()

    def dies(fd, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fdopen", dies)
    with pytest.raises(KeyboardInterrupt):
        RunRef("new", "new", "models:/m-1").write(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # as a plain write: not mkstemp's 0600


def test_unlabeled_images_are_copied_under_their_neutral_names(tiny_demo, tmp_path):
    rel = sorted(p.relative_to(tiny_demo).as_posix() for p in tiny_demo.rglob("*.jpg"))[:2]
    key = UnlabeledKey(pd.DataFrame({"file": ["img_00001.jpg", "img_00002.jpg"],
                                     "label": ["x", "y"], "source_path": rel}))
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    (folder / "stale.jpg").write_bytes(b"left over")
    handoffs.write_unlabeled(key, tiny_demo, folder)
    assert [p.name for p in handoffs.unlabeled_files(folder)] == ["img_00001.jpg",
                                                                  "img_00002.jpg"]
    assert (folder / "img_00002.jpg").read_bytes() == (tiny_demo / rel[1]).read_bytes()
    assert not list(tmp_path.glob(".unlabeled.tmp-*"))
    with pytest.raises(HandoffError, match="dvc repro sample"):
        handoffs.unlabeled_files(Path(tmp_path / "nowhere"))
