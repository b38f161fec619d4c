"""Materialise the configured data source as one index: which images exist, their class,
and whether they belong to the train or the test list.

Every source ends up in the same shape, a :class:`~pipeline.handoffs.SourceIndex` (``path``
relative to the image root, ``label``, ``split``) and a :class:`~pipeline.handoffs.SourceInfo`
(the image root and a fingerprint), so ``sample`` runs one code path for all of them.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import pandas as pd

from pipeline.config import ConfigError, DataConfig, DemoConfig, SampleConfig
from pipeline.errors import PipelineError
from pipeline.handoffs import SourceIndex, SourceInfo
from pipeline.model.imaging import is_image_file
from pipeline.paths import resolve_user_path

log = logging.getLogger(__name__)


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
    lists = {f"{split}.txt": _read_lines(meta / f"{split}.txt") for split in ("train", "test")}
    for name, lines in lists.items():
        for line in lines:
            label = line.split("/", 1)[0]
            if label not in known:
                raise SourceError(
                    f"{meta / name}: line {line!r} names class {label!r}, "
                    "which is not in meta/classes.txt"
                )
    return found, _list_index(lists), classes


def index_imagefolder(
    root: Path, test_fraction: float, seed: int
) -> tuple[Path, pd.DataFrame, list[str], int]:
    """Index ``<root>/<class>/*.{jpg,jpeg,png,webp}`` with a seeded, stratified train/test
    split; returns the root, the index, the classes and how many non-image files were ignored.

    Every name with an image extension is listed, also a broken link: ``sample`` checks each
    file it draws and reports the unreadable ones with the reason."""
    from sklearn.model_selection import train_test_split

    if not root.is_dir():
        raise SourceError(
            f"data.root={root}: not a folder. data.source=imagefolder expects "
            "<root>/<class>/<image>.{jpg,jpeg,png,webp}."
        )
    rows, ignored = [], 0
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.iterdir()):
            if is_image_file(f) and (f.is_file() or f.is_symlink()):
                rows.append({"path": f"{class_dir.name}/{f.name}", "label": class_dir.name})
            elif not f.is_dir():
                ignored += 1
    if ignored:
        log.info("%s: %d file(s) without an image extension ignored", root, ignored)
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
    return root, df, sorted(counts.index), ignored


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


def _list_index(lists: dict[str, list[str]]) -> pd.DataFrame:
    """The index of Food-101-style meta lists (``train.txt``/``test.txt`` lines
    ``<class>/<id>``), rows in the order :func:`index_food101` reads them."""
    rows = [{"path": f"images/{line}.jpg", "label": line.split("/", 1)[0], "split": split}
            for split in ("train", "test") for line in lists[f"{split}.txt"]]
    return pd.DataFrame(rows, columns=["path", "label", "split"])


def materialise(data: DataConfig, demo: DemoConfig, out_dir: Path,
                sample: SampleConfig | None = None) -> tuple[SourceInfo, SourceIndex]:
    """Index the configured source; for ``demo``, first generate its images into ``out_dir``
    (Food-101 layout). An external source is indexed (and validated) before ``out_dir`` is
    emptied. The caller writes the two returned hand-offs into ``out_dir``.

    ``sample``: the demo writes only the images ``sample`` will draw with these settings
    (its meta lists and ``index.csv`` still name every image): about half of them by
    default. None: every image.
    """
    start = time.perf_counter()
    if data.source == "demo":
        from pipeline.data.demo import demo_lists, generate_demo
        from pipeline.data.drawing import MAX_CLASSES
        from pipeline.data.sampling import drawn_paths

        if demo.classes > MAX_CLASSES:
            raise ConfigError(f"demo.classes: must lie in [2, {MAX_CLASSES}] (one class per "
                              f"built-in recipe), got {demo.classes}")
        if data.root:
            log.warning("data.root=%s is ignored for data.source=demo", data.root)
        only = None
        if sample is not None:  # every demo image decodes: the draw needs no image to exist
            lists = demo_lists(demo.classes, demo.train_per_class, demo.test_per_class)
            only = drawn_paths(_list_index(lists), lists["classes.txt"], sample)
        generate_demo(
            out_dir,
            classes=demo.classes,
            train_per_class=demo.train_per_class,
            test_per_class=demo.test_per_class,
            min_side=demo.min_side,
            max_side=demo.max_side,
            seed=demo.seed,
            only=only,
        )
        root, index, classes = index_food101(out_dir)
        root_ref = "."  # relative to out_dir: survives moves and DVC experiment workspaces
        fingerprint_ = None  # DVC hashes the demo photos itself: they are inside out_dir
        ignored = 0
    else:
        ignored = 0
        if data.source == "food101":
            root, index, classes = index_food101(resolve_user_path(data.root), data.download)
        else:
            root, index, classes, ignored = index_imagefolder(
                resolve_user_path(data.root), data.test_fraction, data.seed
            )
        root_ref = str(root)
        # An external folder is outside DVC's view: its (path, size, mtime) fingerprint
        # stands in for it.
        fingerprint_ = fingerprint(root, index["path"].tolist())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
    info = SourceInfo(
        source=data.source,
        root=root_ref,
        classes=tuple(classes),
        train_images=int((index["split"] == "train").sum()),
        test_images=int((index["split"] == "test").sum()),
        fingerprint=fingerprint_,
        ignored_files=ignored,
    )  # no timings: a DVC output must be the same bytes when nothing changed
    log.info(
        "%s source: %d classes, %d train / %d test images listed under %s (%.1f s)",
        data.source, len(classes), info.train_images, info.test_images, root,
        time.perf_counter() - start,
    )
    return info, SourceIndex(index)
