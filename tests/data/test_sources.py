"""Every source in one shape: Food-101 layout, any ImageFolder, and the generated demo."""

import pytest
from PIL import Image

from pipeline.config import ConfigError, DataConfig, DemoConfig
from pipeline.data.sources import (
    SourceError,
    index_food101,
    index_imagefolder,
    materialise,
)
from pipeline.handoffs import SourceIndex, SourceInfo


def test_food101_layout_is_indexed_from_the_official_lists(tiny_demo):
    root, index, classes = index_food101(tiny_demo)
    assert root == tiny_demo and len(classes) == 4
    assert (index["split"] == "train").sum() == 64 and (index["split"] == "test").sum() == 32
    assert all((root / p).is_file() for p in index["path"])


def test_food101_subfolder_and_missing_layout(tiny_demo, tmp_path):
    (tmp_path / "food-101").symlink_to(tiny_demo)
    assert index_food101(tmp_path)[0] == tmp_path / "food-101"
    with pytest.raises(SourceError, match="data.download=true"):
        index_food101(tmp_path / "nowhere")


def test_imagefolder_is_split_by_seed(tmp_path):
    for c in ("cats", "dogs"):
        (tmp_path / c).mkdir()
        for i in range(8):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "cats" / "readme.txt").write_text("not an image")
    _, a, classes, ignored = index_imagefolder(tmp_path, 0.25, seed=1)
    _, b, _, _ = index_imagefolder(tmp_path, 0.25, seed=1)
    _, c, _, _ = index_imagefolder(tmp_path, 0.25, seed=2)
    assert classes == ["cats", "dogs"] and len(a) == 16
    assert ignored == 1  # readme.txt: not an image, counted
    assert a.equals(b) and not a.equals(c)
    assert (a.groupby("label")["split"].apply(lambda s: (s == "test").sum()) == 2).all()
    assert not a["path"].str.endswith(".txt").any()


def test_imagefolder_errors(tmp_path):
    with pytest.raises(SourceError, match="not a folder"):
        index_imagefolder(tmp_path / "x", 0.25, 0)
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "a.png")
    with pytest.raises(SourceError, match="at least 2"):
        index_imagefolder(tmp_path, 0.25, 0)


def _materialise_and_read(data, demo, out, sample=None):
    """What the prepare stage does, then what sample reads back."""
    info, index = materialise(data, demo, out, sample)
    index.write(out / "index.csv")
    info.write(out / "source.json")
    read = SourceInfo.read(out / "source.json")
    assert read == info
    return read, SourceIndex.read(out / "index.csv").frame


def test_materialise_demo_then_load(tmp_path):
    demo = DemoConfig(classes=3, train_per_class=4, test_per_class=2, min_side=40, max_side=48)
    out = tmp_path / "source"
    info, index = _materialise_and_read(DataConfig(), demo, out)
    assert (info.train_images, info.test_images) == (12, 6)
    assert info.root == "."  # relative: valid wherever DVC checks the folder out
    assert info.fingerprint is None
    assert info.image_root(out / "source.json") == out.resolve()
    assert len(index) == 18 and len(info.classes) == 3
    assert all((out / p).is_file() for p in index["path"])


def test_the_demo_writes_only_what_the_sample_draws(tmp_path):
    """With the sample's settings the demo writes only the images the sample will draw; the
    lists still name every image, and the sample drawn from it is the one drawn from every
    image written (the same files, the same bytes)."""
    import dataclasses

    from pipeline.config import SampleConfig
    from pipeline.data.sampling import draw_sample

    demo = DemoConfig(classes=3, train_per_class=10, test_per_class=6, min_side=40,
                      max_side=48)
    cfg = SampleConfig(size=12, test_size=6, unlabeled_size=3, classes="all", seed=7)
    full, part = tmp_path / "full", tmp_path / "part"
    _, index_full = _materialise_and_read(DataConfig(), demo, full)
    _, index_part = _materialise_and_read(DataConfig(), demo, part, cfg)
    assert index_part.equals(index_full) and len(index_part) == 48  # every image listed
    written = sorted(str(f.relative_to(part)) for f in (part / "images").rglob("*.jpg"))
    assert len(written) == 12 + 6 + 3
    a = draw_sample(full, index_full, sorted(index_full["label"].unique()), cfg, 32)
    b = draw_sample(part, index_part, sorted(index_part["label"].unique()), cfg, 32)
    assert a.sample.frame.equals(b.sample.frame) and a.test.frame.equals(b.test.frame)
    assert a.unlabeled_key.frame.equals(b.unlabeled_key.frame)
    assert b.report.skipped_count == 0
    assert sorted([*b.sample.frame["path"], *b.test.frame["path"],
                   *b.unlabeled_key.frame["source_path"]]) == written
    for rel in written:
        assert (part / rel).read_bytes() == (full / rel).read_bytes()

    # Another draw finds photos missing: a message that says what to run, before any work.
    from pipeline.data.sampling import SampleError, check_demo_draw

    classes = sorted(index_part["label"].unique())
    check_demo_draw(part, index_part, classes, cfg)  # the draw it was written for
    check_demo_draw(full, index_full, classes, dataclasses.replace(cfg, seed=8))
    with pytest.raises(SampleError, match=r"another draw: \d+ of the photos .* run `dvc repro`"):
        check_demo_draw(part, index_part, classes, dataclasses.replace(cfg, seed=8))


def test_materialise_food101_records_absolute_root(tiny_demo, tmp_path):
    out = tmp_path / "source"
    (out / "images").mkdir(parents=True)  # a demo set materialised before is replaced
    info, index = _materialise_and_read(DataConfig(source="food101", root=str(tiny_demo)),
                                        DemoConfig(), out)
    assert info.image_root(out / "source.json") == tiny_demo and len(index) == 96
    assert info.fingerprint and not (out / "images").exists()


def test_too_many_demo_classes_is_a_parameter_error(tmp_path):
    with pytest.raises(ConfigError, match=r"demo.classes: must lie in \[2, \d+\]"):
        materialise(DataConfig(), DemoConfig(classes=999), tmp_path / "source")
    assert not (tmp_path / "source").exists()


def test_download_failure_offline_is_explained(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(root, download):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "Food101", offline)
    with pytest.raises(SourceError, match="could not be downloaded") as err:
        index_food101(tmp_path / "food", download=True)
    assert "place the extracted food-101/ folder there" in str(err.value)


def test_demo_source_is_byte_identical_when_regenerated(tmp_path):
    """A DVC output: regenerating it with the same params must give the same bytes."""
    import hashlib

    demo = DemoConfig(classes=2, train_per_class=3, test_per_class=1, min_side=40, max_side=44)

    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    _materialise_and_read(DataConfig(), demo, tmp_path / "a")
    first = digest(tmp_path / "a")
    _materialise_and_read(DataConfig(), demo, tmp_path / "a")
    assert digest(tmp_path / "a") == first
