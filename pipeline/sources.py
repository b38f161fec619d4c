"""Materialise the configured data source as one index: which images exist, their class,
and whether they belong to the train or the test list.

Every source ends up in the same shape, ``<out_dir>/index.csv`` (``path`` relative to the
image root, ``label``, ``split``) and ``<out_dir>/source.json`` (the image root and a
fingerprint), so ``sample`` runs one code path for all of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import pandas as pd

from pipeline.config import DataConfig, DemoConfig
from pipeline.errors import PipelineError
from pipeline.imaging import is_image_file
from pipeline.paths import resolve_user_path

log = logging.getLogger(__name__)

INDEX_FILE = "index.csv"
SOURCE_FILE = "source.json"


class SourceError(PipelineError):
    """The data source is missing or not in the expected layout."""


def _read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def food101_root(root: Path) -> Path | None:
    """The folder holding ``images/`` and ``meta/`` (``root`` itself or ``root/food-101``)."""
    for cand in (root, root / "food-101"):
        if (cand / "meta" / "classes.txt").is_file() and (cand / "images").is_dir():
            return cand
    return None


def _food101_layout_error(root: Path) -> SourceError:
    return SourceError(
        f"data.root={root}: no Food-101 layout found there. Expected images/<class>/<id>.jpg "
        "and meta/classes.txt, meta/train.txt, meta/test.txt (lines '<class>/<id>'), either in "
        "that folder or in its food-101/ subfolder. Point data.root at the extracted dataset, "
        "or set data.download=true to fetch it with torchvision (needs a network)."
    )


def index_food101(root: Path, download: bool = False) -> tuple[Path, pd.DataFrame, list[str]]:
    """Index a Food-101-layout folder from its official train/test lists."""
    found = food101_root(root)
    if found is None and download:
        # torchvision's own downloader (https://data.vision.ee.ethz.ch/cvl/food-101.tar.gz).
        from torchvision.datasets import Food101

        log.info("Downloading Food-101 into %s (about 5 GB) ...", root)
        root.mkdir(parents=True, exist_ok=True)
        try:
            Food101(root=str(root), download=True)
        except OSError as exc:  # URLError is an OSError
            raise SourceError(
                f"data.download=true but Food-101 could not be downloaded into {root}: {exc}. "
                "Without a network, place the extracted food-101/ folder there instead."
            ) from exc
        found = food101_root(root)
    if found is None:
        raise _food101_layout_error(root)
    meta = found / "meta"
    for name in ("train.txt", "test.txt"):
        if not (meta / name).is_file():
            raise _food101_layout_error(root)
    classes = _read_lines(meta / "classes.txt")
    known = set(classes)
    rows = []
    for split in ("train", "test"):
        for line in _read_lines(meta / f"{split}.txt"):
            label = line.split("/", 1)[0]
            if label not in known:
                raise SourceError(
                    f"{meta / (split + '.txt')}: line {line!r} names class {label!r}, "
                    "which is not in meta/classes.txt"
                )
            rows.append({"path": f"images/{line}.jpg", "label": label, "split": split})
    return found, pd.DataFrame(rows, columns=["path", "label", "split"]), classes


def index_imagefolder(
    root: Path, test_fraction: float, seed: int
) -> tuple[Path, pd.DataFrame, list[str]]:
    """Index ``<root>/<class>/*.{jpg,jpeg,png,webp}`` with a seeded, stratified train/test split."""
    from sklearn.model_selection import train_test_split

    if not root.is_dir():
        raise SourceError(
            f"data.root={root}: not a folder. data.source=imagefolder expects "
            "<root>/<class>/<image>.{jpg,jpeg,png,webp}."
        )
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.iterdir()):
            if f.is_file() and is_image_file(f):
                rows.append({"path": f"{class_dir.name}/{f.name}", "label": class_dir.name})
    df = pd.DataFrame(rows, columns=["path", "label"])
    counts = df["label"].value_counts()
    if len(counts) < 2:
        raise SourceError(
            f"data.root={root}: found {len(counts)} class folder(s) with images; "
            "imagefolder needs at least 2 (<root>/<class>/<image>.jpg)."
        )
    if counts.min() < 2:
        raise SourceError(
            f"data.root={root}: class {counts.idxmin()!r} has {counts.min()} image(s); each "
            "class needs at least 2 to be split into train and test."
        )
    train, test = train_test_split(
        df, test_size=test_fraction, stratify=df["label"], random_state=seed
    )
    df = pd.concat([train.assign(split="train"), test.assign(split="test")])
    df = df.sort_values(["split", "label", "path"], ignore_index=True)
    return root, df, sorted(counts.index)


def fingerprint(root: Path, paths: list[str]) -> str:
    """Hash of (path, size, mtime) of every listed file: changes when the photos change."""
    h = hashlib.sha256()
    for rel in paths:
        try:
            st = (root / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()


def materialise(data: DataConfig, demo: DemoConfig, out_dir: Path) -> dict:
    """Produce ``index.csv`` and ``source.json`` in ``out_dir`` for the configured source.

    For ``demo`` the images themselves are generated into ``out_dir`` (Food-101 layout).
    """
    start = time.perf_counter()
    if data.source == "demo":
        from pipeline.demo import generate_demo

        if data.root:
            log.warning("data.root=%s is ignored for data.source=demo", data.root)
        generate_demo(
            out_dir,
            classes=demo.classes,
            train_per_class=demo.train_per_class,
            test_per_class=demo.test_per_class,
            min_side=demo.min_side,
            max_side=demo.max_side,
            seed=demo.seed,
        )
        root, index, classes = index_food101(out_dir)
        root_ref = "."  # relative to out_dir: survives moves and DVC experiment workspaces
    else:
        # Index (and validate) the external folder before touching out_dir.
        if data.source == "food101":
            root, index, classes = index_food101(resolve_user_path(data.root), data.download)
        else:
            root, index, classes = index_imagefolder(
                resolve_user_path(data.root), data.test_fraction, data.seed
            )
        root_ref = str(root)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
    index.to_csv(out_dir / INDEX_FILE, index=False)
    summary = {
        "source": data.source,
        "root": root_ref,
        "classes": classes,
        "train_images": int((index["split"] == "train").sum()),
        "test_images": int((index["split"] == "test").sum()),
    }  # no timings: a DVC output must be the same bytes when nothing changed
    if data.source != "demo":
        # DVC hashes the demo photos itself (they are inside the output); an external
        # folder is outside DVC's view, so its (path, size, mtime) fingerprint stands in.
        summary["fingerprint"] = fingerprint(root, index["path"].tolist())
    (out_dir / SOURCE_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "%s source: %d classes, %d train / %d test images listed under %s (%.1f s)",
        data.source, len(classes), summary["train_images"], summary["test_images"], root,
        time.perf_counter() - start,
    )
    return summary


def load_index(source_dir: Path) -> tuple[Path, pd.DataFrame, list[str]]:
    """Read what :func:`materialise` wrote: (image root, index, classes in order)."""
    info_file = source_dir / SOURCE_FILE
    if not info_file.is_file():
        raise SourceError(f"{info_file} is missing: run `dvc repro prepare` first")
    info = json.loads(info_file.read_text())
    root = Path(info["root"])
    root = root if root.is_absolute() else (source_dir / root).resolve()
    if not root.is_dir():
        raise SourceError(
            f"image root {root} (from {info_file}) does not exist: was data.root moved? "
            "Run `dvc repro -f prepare`."
        )
    index = pd.read_csv(source_dir / INDEX_FILE, dtype=str)
    return root, index, list(info["classes"])


def sampled_root(report_file: Path) -> tuple[Path, list[str]]:
    """The image root and the class order that ``sample`` recorded in ``report_file``.

    The stages after ``split`` read images through this root, not ``data/source``: the
    manifests pin every image's sha256, so DVC need not re-hash the whole source for them.
    """
    if not report_file.is_file():
        raise SourceError(f"{report_file} is missing: run `dvc repro sample` first")
    report = json.loads(report_file.read_text())
    root = Path(report["root"]).expanduser()
    root = root if root.is_absolute() else root.resolve()
    if not root.is_dir():
        raise SourceError(
            f"image root {root} (from {report_file}) does not exist: run `dvc repro` (or "
            "`dvc checkout data/source` if DVC's cache holds it)."
        )
    return root, list(report["classes"])
