"""Tests of the synthetic demo dataset generator (tiny settings, a few seconds)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.demo import generate_demo
from pipeline.data.drawing import MAX_CLASSES, RECIPES, class_names

TINY = dict(classes=3, train_per_class=4, test_per_class=2, min_side=48, max_side=64)
FIRST_24_SHA256_16 = "18228f4f18bd710f"  # the recipe names of the 24-class demo, in order


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, generate_demo(out, seed=7, workers=2, **TINY)


def test_same_seed_is_byte_identical_whatever_the_workers(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    generate_demo(again, seed=7, workers=1, **TINY)
    reference = _digests(out)
    assert len(reference) == 3 * (4 + 2) + 4
    assert _digests(again) == reference
    # Regenerating into an existing directory replaces it cleanly, with the same bytes.
    (again / "stale.txt").write_text("left over")
    generate_demo(again, seed=7, workers=2, **TINY)
    assert _digests(again) == reference
    assert not list(tmp_path.glob(".again.tmp-*"))


@pytest.mark.parametrize("workers", [1, 2])
def test_only_the_images_asked_for_are_written(tiny, tmp_path, workers):
    """``only``: just those images, each the same bytes as in the whole set; the meta lists
    unchanged (they name every image)."""
    out, summary = tiny
    reference = _digests(out)
    images = sorted(k for k in reference if k.startswith("images/"))
    only = set(images[::3])
    part = tmp_path / "part"
    written = generate_demo(part, seed=7, workers=workers, only=only, **TINY)
    got = _digests(part)
    assert {k for k in got if k.startswith("images/")} == only
    assert all(got[k] == reference[k] for k in got)  # images and meta lists
    assert written["written"] == len(only) and summary["written"] == len(images)
    assert written["images"] == summary["images"]  # listed


def test_different_seed_gives_different_images(tiny, tmp_path):
    out, _ = tiny
    other = tmp_path / "other"
    generate_demo(other, seed=8, workers=2, **TINY)
    a, b = _digests(out), _digests(other)
    assert a.keys() == b.keys()
    images = [k for k in a if k.startswith("images/")]
    assert all(a[k] != b[k] for k in images)
    assert all(a[k] == b[k] for k in a if k.startswith("meta/"))


def test_layout_and_metadata(tiny):
    out, summary = tiny
    names = (out / "meta" / "classes.txt").read_text().splitlines()
    assert names == sorted(names) == class_names(3) == summary["class_names"]
    assert len(set(names)) == 3
    assert all(n.replace("_", "").isalpha() and n == n.lower() for n in names)
    labels = (out / "meta" / "labels.txt").read_text().splitlines()
    assert labels == [n.replace("_", " ").capitalize() for n in names]
    assert sorted(p.name for p in (out / "images").iterdir()) == names

    train = (out / "meta" / "train.txt").read_text().splitlines()
    test = (out / "meta" / "test.txt").read_text().splitlines()
    assert len(train) == 3 * 4 and len(test) == 3 * 2
    assert not set(train) & set(test)
    for lines, per_class in ((train, 4), (test, 2)):
        expected = [n for n in names for _ in range(per_class)]
        assert [line.split("/")[0] for line in lines] == expected

    listed = set(train) | set(test)
    on_disk = {p.relative_to(out / "images").with_suffix("").as_posix()
               for p in (out / "images").rglob("*.jpg")}  # fmt: skip
    assert on_disk == listed
    sizes = set()
    for entry in sorted(listed):
        with Image.open(out / "images" / f"{entry}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert 48 <= img.width <= 64 and 48 <= img.height <= 64
            assert "exif" not in img.info
            img.load()
            sizes.add(img.size)
    assert len(sizes) > 1  # sizes vary per image

    assert summary["classes"] == 3
    assert summary["train_images"] == 12 and summary["test_images"] == 6
    assert summary["images"] == 18
    assert summary["bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert summary["seconds"] >= 0


def test_recipes_are_distinct_and_enough():
    assert MAX_CLASSES == len(RECIPES) >= 101  # Food-101's size
    assert len({r.name for r in RECIPES}) == len(RECIPES)
    # The first 24 are the recipes of the 24-class demo (a demo of up to 24 classes, the
    # default 20 among them, is what it was before more recipes were added).
    first24 = ",".join(r.name for r in RECIPES[:24])
    assert hashlib.sha256(first24.encode()).hexdigest()[:16] == FIRST_24_SHA256_16
    assert len(class_names(101)) == 101
    # No single cue gives a class away: hues, shapes and patterns are each shared.
    first20 = RECIPES[:20]
    for attr in ("hue", "shape", "pattern"):
        values = [getattr(r, attr) for r in first20]
        assert len(set(values)) < len(values) / 2


def test_too_many_classes_names_the_maximum(tmp_path):
    with pytest.raises(ValueError, match=str(MAX_CLASSES)):
        generate_demo(tmp_path / "x", **{**TINY, "classes": MAX_CLASSES + 1})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "override",
    [{"classes": 0}, {"train_per_class": 0}, {"min_side": 80}, {"workers": 0}],
)
def test_invalid_arguments(tmp_path, override):
    with pytest.raises(ValueError):
        generate_demo(tmp_path / "x", **{**TINY, **override})


def test_refuses_to_replace_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="refusing"):
        generate_demo(Path("."), **TINY)
    assert (tmp_path / "keep.txt").read_text() == "precious"
