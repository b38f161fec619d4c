import json

import pytest
from PIL import Image

from pipeline.config import DataConfig, DemoConfig
from pipeline.sources import (
    SourceError,
    index_food101,
    index_imagefolder,
    load_index,
    materialise,
    sampled_root,
)


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
    _, a, classes = index_imagefolder(tmp_path, 0.25, seed=1)
    _, b, _ = index_imagefolder(tmp_path, 0.25, seed=1)
    _, c, _ = index_imagefolder(tmp_path, 0.25, seed=2)
    assert classes == ["cats", "dogs"] and len(a) == 16
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


def test_materialise_demo_then_load(tmp_path):
    demo = DemoConfig(classes=3, train_per_class=4, test_per_class=2, min_side=40, max_side=48)
    out = tmp_path / "source"
    summary = materialise(DataConfig(), demo, out)
    assert summary["train_images"] == 12 and summary["test_images"] == 6
    info = json.loads((out / "source.json").read_text())
    assert info["root"] == "."  # relative: valid wherever DVC checks the folder out
    root, index, classes = load_index(out)
    assert root == out.resolve() and len(index) == 18 and len(classes) == 3


def test_materialise_food101_records_absolute_root(tiny_demo, tmp_path):
    out = tmp_path / "source"
    materialise(DataConfig(source="food101", root=str(tiny_demo)), DemoConfig(), out)
    root, index, _ = load_index(out)
    assert root == tiny_demo and len(index) == 96
    with pytest.raises(SourceError, match="run `dvc repro prepare`"):
        load_index(tmp_path / "nothing")


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

    materialise(DataConfig(), demo, tmp_path / "a")
    first = digest(tmp_path / "a")
    materialise(DataConfig(), demo, tmp_path / "a")
    assert digest(tmp_path / "a") == first


def test_sampled_root_resolves_or_explains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "reports" / "sample.json"
    with pytest.raises(SourceError, match="run `dvc repro sample`"):
        sampled_root(report)
    report.parent.mkdir()
    report.write_text(json.dumps({"root": "data/source", "classes": ["a", "b"]}))
    with pytest.raises(SourceError, match="does not exist"):
        sampled_root(report)
    (tmp_path / "data" / "source").mkdir(parents=True)
    assert sampled_root(report) == ((tmp_path / "data" / "source").resolve(), ["a", "b"])
