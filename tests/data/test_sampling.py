"""``sample`` and ``split``: stratified, seeded, from the right lists, disjoint, and only
decodable images."""

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    make_project,
    photo,
    require_shared_photos,
    sh,
    tiny_params,
    write_zoo,
)
from PIL import Image

from pipeline.config import SampleConfig, SplitConfig
from pipeline.data.sampling import SampleError, draw_sample, split_sample
from pipeline.data.sources import index_food101
from pipeline.handoffs import write_unlabeled


def _draw(root, tmp_path=None, name="u", **sample):
    params = tiny_params(sample=sample)
    r, index, classes = index_food101(root)
    res = draw_sample(r, index, classes, params.sample, 32)
    if tmp_path is not None:
        write_unlabeled(res.unlabeled_key, r, tmp_path / name)
    return res, index


def test_same_seed_same_manifests(tiny_demo):
    a, _ = _draw(tiny_demo)
    b, _ = _draw(tiny_demo)
    c, _ = _draw(tiny_demo, seed=99)
    pd.testing.assert_frame_equal(a.sample.frame, b.sample.frame)
    pd.testing.assert_frame_equal(a.test.frame, b.test.frame)
    pd.testing.assert_frame_equal(a.unlabeled_key.frame, b.unlabeled_key.frame)
    assert not a.sample.frame.equals(c.sample.frame)
    ta, va = split_sample(a.sample.frame, SplitConfig())
    tb, vb = split_sample(b.sample.frame, SplitConfig())
    pd.testing.assert_frame_equal(ta, tb)
    pd.testing.assert_frame_equal(va, vb)


def test_lists_are_respected_and_sets_disjoint(tiny_demo):
    res, index = _draw(tiny_demo)
    train_list = set(index.loc[index["split"] == "train", "path"])
    test_list = set(index.loc[index["split"] == "test", "path"])
    train, val = split_sample(res.sample.frame, SplitConfig(val_fraction=0.25))
    sets = {
        "train": set(train["path"]), "val": set(val["path"]),
        "test": set(res.test.frame["path"]),
        "unlabeled": set(res.unlabeled_key.frame["source_path"]),
    }
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], f"{a} and {b} overlap"
    assert sets["train"] | sets["val"] <= train_list
    assert sets["test"] | sets["unlabeled"] <= test_list
    assert len(train) + len(val) == 48
    assert len(res.test.frame) == 16 and len(res.unlabeled_key.frame) == 6


def test_unlabeled_files_have_neutral_names_and_a_separate_key(tiny_demo, tmp_path):
    res, _ = _draw(tiny_demo, tmp_path)
    files = sorted(p.name for p in (tmp_path / "u").iterdir())
    assert files == sorted(res.unlabeled_key.frame["file"])
    for row in res.unlabeled_key.frame.itertuples():
        assert row.file.startswith("img_") and row.label not in row.file
        copied = (tmp_path / "u" / row.file).read_bytes()
        assert copied == (tiny_demo / row.source_path).read_bytes()


def test_stratified_counts_differ_by_at_most_one(tiny_demo):
    res, _ = _draw(tiny_demo, size=50, test_size=14)
    for df in (res.sample.frame, res.test.frame):
        counts = df["label"].value_counts()
        assert len(counts) == 4 and counts.max() - counts.min() <= 1


@pytest.mark.parametrize("seed", range(6))
def test_split_keeps_every_class_in_proportion(seed):
    """Stratified: each class is split val_fraction / 1 - val_fraction on its own, also when
    the classes are of very different sizes (an unstratified split is not)."""
    sizes = {"a": 60, "b": 30, "c": 10}
    df = pd.DataFrame({
        "path": [f"{c}/{i}.jpg" for c, n in sizes.items() for i in range(n)],
        "label": [c for c, n in sizes.items() for _ in range(n)],
    })
    df["class_index"] = df["label"].map({"a": 0, "b": 1, "c": 2})
    train, val = split_sample(df, SplitConfig(val_fraction=0.2, seed=seed))
    assert val["label"].value_counts().to_dict() == {"a": 12, "b": 6, "c": 2}
    assert train["label"].value_counts().to_dict() == {"a": 48, "b": 24, "c": 8}
    assert not set(train["path"]) & set(val["path"])
    other = split_sample(df, SplitConfig(val_fraction=0.2, seed=seed + 100))[1]
    assert set(other["path"]) != set(val["path"])  # the seed decides which ones


def test_class_selection(tiny_demo):
    res, index = _draw(tiny_demo, size=20, test_size=6, classes=2)
    first_two = sorted(index["label"].unique())[:2]
    assert sorted(res.sample.frame["label"].unique()) == first_two
    assert list(res.report.classes) == first_two
    with pytest.raises(SampleError, match="unknown class"):
        _draw(tiny_demo, classes=["nope", first_two[0]])


def test_over_large_sample_is_a_clear_error(tiny_demo):
    with pytest.raises(SampleError) as err:
        _draw(tiny_demo, size=65)
    msg = str(err.value)
    assert "asked for 65" in msg and "hold only 64" in msg and ": 16" in msg
    with pytest.raises(SampleError, match="asked for 40"):
        _draw(tiny_demo, test_size=40)


def test_bad_files_are_skipped_reported_or_converted(tiny_demo, tmp_path):
    root = tmp_path / "food"
    shutil.copytree(tiny_demo, root)
    _, index, _ = index_food101(root)
    train = index.loc[index["split"] == "train", "path"].tolist()
    bad = {train[0]: "truncated", train[1]: "zero-byte", train[2]: "text"}
    data = (root / train[0]).read_bytes()
    (root / train[0]).write_bytes(data[: len(data) // 3])
    (root / train[1]).write_bytes(b"")
    (root / train[2]).write_text("hello, not a jpeg")
    # Odd but valid images, saved under their .jpg names: they must be converted, not skipped.
    Image.open(root / train[3]).convert("CMYK").save(root / train[3], "JPEG")
    pal = Image.open(root / train[4]).convert("P")
    pal.save(root / train[4], "PNG", transparency=0)
    Image.open(root / train[5]).convert("I;16").save(root / train[5], "PNG")
    res, _ = _draw(root, size=len(train) - len(bad))
    report = res.report
    assert report.skipped_count == 3
    assert {s.path for s in report.skipped} == set(bad)
    assert all(s.reason and s.split == "train" for s in report.skipped)
    sample = res.sample.frame
    assert not set(bad) & set(sample["path"])
    assert {train[3], train[4], train[5]} <= set(sample["path"])
    counts = sample["label"].value_counts()
    assert counts.max() - counts.min() <= 1 or counts.min() == 16 - 3  # short class took all


def test_split_needs_every_class_on_both_sides():
    df = pd.DataFrame({"path": list("abcd"), "label": ["x", "x", "y", "y"],
                       "class_index": [0, 0, 1, 1]})
    with pytest.raises(SampleError, match="split.val_fraction"):
        split_sample(df, SplitConfig(val_fraction=0.1))


def test_real_food101_photos_train_and_test_lists():
    """On the shared Food-101 subset: real photos, the official lists."""
    r, index, classes = index_food101(require_shared_photos())
    cfg = SampleConfig(size=4 * len(classes), test_size=2 * len(classes), unlabeled_size=5)
    res = draw_sample(r, index, classes, cfg, 128)
    train_list = {f"images/{ln}.jpg" for ln in (r / "meta/train.txt").read_text().split()}
    test_list = {f"images/{ln}.jpg" for ln in (r / "meta/test.txt").read_text().split()}
    assert set(res.sample.frame["path"]) <= train_list
    assert set(res.test.frame["path"]) | set(res.unlabeled_key.frame["source_path"]) <= test_list
    assert res.sample.frame["label"].value_counts().eq(4).all()
    assert res.report.skipped_count == 0


def test_manifests_pin_each_image_by_sha256(tiny_demo):
    """The stages after split depend on the manifests, not on the source folder: each row
    carries the sha256 of the bytes that were checked, and split keeps it."""
    res, _ = _draw(tiny_demo)
    for df in (res.sample.frame, res.test.frame, *split_sample(res.sample.frame, SplitConfig())):
        assert list(df.columns[:4]) == ["path", "label", "class_index", "sha256"]
        for rel, digest in zip(df["path"], df["sha256"], strict=True):
            assert digest == hashlib.sha256((tiny_demo / rel).read_bytes()).hexdigest()


# -- the image zoo: bad files skipped with the reason, odd ones converted and used --------


def _zoo_folder(root: Path) -> dict:
    """Classes of equal size, the zoo inside the first one: a sample that asks for every
    readable train image must try every file of the train list."""
    kinds = write_zoo(root / "dish_a")
    n_zoo = sum(k != "stray" for k in kinds.values())
    for c, colour in (("dish_a", (200, 60, 60)), ("dish_b", (60, 200, 60)),
                      ("dish_c", (60, 60, 200))):
        (root / c).mkdir(exist_ok=True)
        for i in range(24 - (n_zoo if c == "dish_a" else 0)):
            photo(colour=tuple(min(255, v + 5 * i) for v in colour)).save(root / c / f"{i}.jpg")
    return {f"dish_a/{n}": k for n, k in kinds.items()}


def test_sample_skips_the_bad_files_and_uses_the_odd_ones(tmp_path):
    from pipeline.data.sources import index_imagefolder

    kinds = _zoo_folder(tmp_path)
    root, index, classes, ignored = index_imagefolder(tmp_path, 0.25, seed=0)
    assert ignored == 1  # notes.txt
    assert set(index["path"]) == {p for p, k in kinds.items() if k != "stray"} | set(
        index.loc[~index["path"].str.startswith("dish_a/") | ~index["path"].isin(kinds), "path"])
    train = set(index.loc[index["split"] == "train", "path"])
    bad = {p for p, k in kinds.items() if k == "bad"}
    odd = {p for p, k in kinds.items() if k == "odd"}
    size = len(train - bad)  # every readable train image
    params = tiny_params(sample={"size": size, "test_size": 6, "unlabeled_size": 2})
    res = draw_sample(root, index, classes, params.sample, 32)
    used = set(res.sample.frame["path"]) | set(res.test.frame["path"]) | set(
        res.unlabeled_key.frame["source_path"])
    skipped = {s.path: s.reason for s in res.report.skipped}
    assert not used & bad  # no bad file in any manifest
    assert train & bad <= set(skipped) <= bad  # every bad one it touched, with the reason
    assert all(skipped.values()) and res.report.skipped_count == len(skipped)
    assert train & odd <= set(res.sample.frame["path"])  # the odd formats are used


@pytest.mark.slow
def test_real_photos_with_one_bad_file_of_each_kind(tmp_path):
    """An ImageFolder of real Food-101 photos plus the zoo: `dvc repro` succeeds, no bad file
    in any manifest, each one the sample touched is listed with its reason, the odd formats
    are used."""
    from pipeline.data.sources import index_imagefolder

    mini = require_shared_photos()
    folder = tmp_path / "photos"
    classes = sorted(p.name for p in (mini / "images").iterdir())[:3]
    base = Image.open(next((mini / "images" / classes[0]).glob("*.jpg"))).convert("RGB")
    kinds = {f"{classes[0]}/{n}": k for n, k in write_zoo(folder / classes[0], base).items()}
    n_zoo = sum(k != "stray" for k in kinds.values())
    for c in classes:
        (folder / c).mkdir(exist_ok=True)
        photos = sorted((mini / "images" / c).glob("*.jpg"))
        for src in photos[: 30 - (n_zoo if c == classes[0] else 0)]:
            (folder / c / src.name).symlink_to(src)
    _, index, _, _ = index_imagefolder(folder, 0.3, seed=0)
    train = set(index.loc[index["split"] == "train", "path"])
    bad = {p for p, k in kinds.items() if k == "bad"}
    odd = {p for p, k in kinds.items() if k == "odd"}
    repo = tmp_path / "repo"
    env = make_project(repo, {
        "data": {"source": "imagefolder", "root": str(folder), "image_size": 32,
                 "test_fraction": 0.3, "seed": 0},
        "sample": {"size": len(train - bad), "test_size": 12, "unlabeled_size": 4},
    })
    sh(repo, "dvc", "repro", env=env)
    report = json.loads((repo / "reports" / "sample.json").read_text())
    source = json.loads((repo / "data" / "source" / "source.json").read_text())
    assert source["ignored_files"] == 1
    sample = pd.read_csv(repo / "data" / "manifests" / "sample.csv")
    test = pd.read_csv(repo / "data" / "manifests" / "test.csv")
    key = pd.read_csv(repo / "data" / "manifests" / "unlabeled_key.csv")
    used = set(sample["path"]) | set(test["path"]) | set(key["source_path"])
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert not used & bad
    assert train & bad <= set(skipped) <= bad and all(skipped.values())
    assert train & odd <= set(sample["path"])
    assert (repo / "predictions" / "predictions.csv").is_file()


def test_all_takes_every_image_of_the_lists_and_the_unlabeled_stay_apart(tiny_demo):
    res, index = _draw(tiny_demo, size="all", test_size="all", unlabeled_size=6)
    train_list = set(index.loc[index["split"] == "train", "path"])
    test_list = set(index.loc[index["split"] == "test", "path"])
    unlabeled = set(res.unlabeled_key.frame["source_path"])
    assert set(res.sample.frame["path"]) == train_list
    assert len(unlabeled) == 6 and unlabeled <= test_list
    assert set(res.test.frame["path"]) == test_list - unlabeled
    assert res.report.counts == {"sample": len(train_list), "test": len(test_list) - 6,
                                 "unlabeled": 6}
    again, _ = _draw(tiny_demo, size="all", test_size="all", unlabeled_size=6)
    pd.testing.assert_frame_equal(res.unlabeled_key.frame, again.unlabeled_key.frame)


def test_all_skips_the_unreadable_files_and_reports_them(tmp_path):
    from pipeline.data.sources import index_imagefolder

    kinds = _zoo_folder(tmp_path)
    root, index, classes, _ = index_imagefolder(tmp_path, 0.25, seed=0)
    bad = {p for p, k in kinds.items() if k == "bad"}
    params = tiny_params(sample={"size": "all", "test_size": "all", "unlabeled_size": 2})
    res = draw_sample(root, index, classes, params.sample, 32)
    train = set(index.loc[index["split"] == "train", "path"])
    test = set(index.loc[index["split"] == "test", "path"])
    unlabeled = set(res.unlabeled_key.frame["source_path"])
    assert set(res.sample.frame["path"]) == train - bad
    assert set(res.test.frame["path"]) == test - bad - unlabeled
    skipped = [s.path for s in res.report.skipped]
    assert sorted(skipped) == sorted(set(skipped)) and set(skipped) == bad  # each once
