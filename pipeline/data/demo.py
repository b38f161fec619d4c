"""The embedded synthetic "demo" dataset, written in Food-101's own layout: the pictures of
:mod:`pipeline.data.drawing`'s recipes, one class per recipe.

Output (``out_dir``)::

    images/<class_name>/<id>.jpg
    meta/classes.txt  meta/labels.txt  meta/train.txt  meta/test.txt

Each image is the same bytes whatever ``workers`` is and whichever other images are written
(``only``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipeline.data.drawing import RECIPES, check_classes, image_bytes
from pipeline.progress import progress

log = logging.getLogger(__name__)

# Test images get ids from this offset, so train and test images never share an RNG stream
# and the train images do not change when test_per_class changes (and vice versa).
TEST_ID_OFFSET = 1_000_000
_CHUNK = 50  # images per unit of work handed to a worker process


def _image_id(index: int) -> str:
    return f"{index:07d}"


def _write_chunk(task: tuple[str, int, int, list[int], int, int]) -> int:
    """Render and write one chunk of images of one class; returns bytes written."""
    root, seed, ci, ids, min_side, max_side = task
    folder = Path(root) / "images" / RECIPES[ci].name
    total = 0
    for i in ids:
        data = image_bytes(seed, ci, i, min_side, max_side)
        (folder / f"{_image_id(i)}.jpg").write_bytes(data)
        total += len(data)
    return total


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for k in range(0, len(ids), _CHUNK):
        yield ids[k : k + _CHUNK]


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _ids(train_per_class: int, test_per_class: int) -> tuple[list[int], list[int]]:
    return (list(range(train_per_class)),
            list(range(TEST_ID_OFFSET, TEST_ID_OFFSET + test_per_class)))


def demo_lists(classes: int, train_per_class: int, test_per_class: int) -> dict[str, list[str]]:
    """The meta lists of the demo (``classes.txt``, ``labels.txt``, ``train.txt``,
    ``test.txt``): what ``generate_demo`` writes, known before any image exists."""
    ordered = sorted(RECIPES[:classes], key=lambda r: r.name)
    train_ids, test_ids = _ids(train_per_class, test_per_class)
    return {
        "classes.txt": [r.name for r in ordered],
        "labels.txt": [r.label for r in ordered],
        "train.txt": [f"{r.name}/{_image_id(i)}" for r in ordered for i in train_ids],
        "test.txt": [f"{r.name}/{_image_id(i)}" for r in ordered for i in test_ids],
    }


def generate_demo(
    out_dir: Path,
    *,
    classes: int = 20,
    train_per_class: int = 750,
    test_per_class: int = 250,
    min_side: int = 144,
    max_side: int = 192,
    seed: int = 101,
    workers: int = 2,
    only: set[str] | None = None,
) -> dict:
    """Write the synthetic demo dataset in Food-101's layout to ``out_dir`` (replacing it).

    ``only``: the images to write (paths ``images/<class>/<id>.jpg``), e.g. those the sample
    will draw; the meta lists still name every image. Each image is the same bytes whichever
    others are written.

    Returns a summary: class names, image counts, bytes written and seconds taken.
    Raises ValueError for impossible arguments (e.g. more classes than the built-in recipes).
    """
    check_classes(classes)
    if not 1 <= train_per_class < TEST_ID_OFFSET:
        raise ValueError(f"train_per_class must be in [1, {TEST_ID_OFFSET}), got {train_per_class}")
    if not 1 <= test_per_class < TEST_ID_OFFSET:
        raise ValueError(f"test_per_class must be in [1, {TEST_ID_OFFSET}), got {test_per_class}")
    if min_side < 16 or max_side < min_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    start = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    if out_dir == Path(out_dir.anchor) or Path.cwd().is_relative_to(out_dir):
        raise ValueError(f"refusing to replace {out_dir}: it is / or holds the working directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    _remove(tmp)
    recipes = RECIPES[:classes]
    train_ids, test_ids = _ids(train_per_class, test_per_class)
    wanted = {ci: [i for i in train_ids + test_ids
                   if only is None or f"images/{r.name}/{_image_id(i)}.jpg" in only]
              for ci, r in enumerate(recipes)}
    written = sum(len(ids) for ids in wanted.values())
    log.info(
        "Generating demo dataset: %d classes x (%d train + %d test) images listed, %s, "
        "%d-%d px, seed %d, %d worker(s) -> %s",
        classes, train_per_class, test_per_class,
        "all written" if only is None else f"the {written} the sample draws written",
        min_side, max_side, seed, workers, out_dir,
    )  # fmt: skip
    try:
        for r in recipes:
            (tmp / "images" / r.name).mkdir(parents=True)
        tasks = [
            (str(tmp), seed, ci, chunk, min_side, max_side)
            for ci in range(classes)
            for chunk in _chunks(wanted[ci])
        ]
        image_total = 0
        with progress(written, "demo images") as bar:
            if workers == 1:
                for task in tasks:
                    image_total += _write_chunk(task)
                    bar.update(len(task[3]))
            else:
                # fork where available: no re-import of the caller's __main__ (works from
                # scripts without a main guard); the workers only use NumPy and Pillow.
                methods = multiprocessing.get_all_start_methods()
                ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    for task, size in zip(tasks, pool.map(_write_chunk, tasks),
                                             strict=True):
                        image_total += size
                        bar.update(len(task[3]))

        meta = demo_lists(classes, train_per_class, test_per_class)
        (tmp / "meta").mkdir()
        meta_total = 0
        for name, lines in meta.items():
            data = ("\n".join(lines) + "\n").encode("utf-8")
            (tmp / "meta" / name).write_bytes(data)
            meta_total += len(data)
        _remove(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    seconds = time.perf_counter() - start
    summary = {
        "classes": classes,
        "class_names": meta["classes.txt"],
        "train_images": classes * train_per_class,
        "test_images": classes * test_per_class,
        "images": classes * (train_per_class + test_per_class),
        "written": written,
        "bytes": image_total + meta_total,
        "seconds": round(seconds, 3),
        "seed": seed,
    }
    log.info(
        "Demo dataset ready: %d images, %.1f MB in %.1f s (%s)",
        written, summary["bytes"] / 1e6, seconds, out_dir,
    )  # fmt: skip
    return summary
