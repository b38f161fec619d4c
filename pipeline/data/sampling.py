"""``sample`` and ``split``: stratified, seeded draws that only ever admit decodable images.

Train sample from the train list only; test set and unlabeled predict inputs from the test
list only, disjoint from each other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import ALL, SampleConfig, SplitConfig
from pipeline.errors import PipelineError
from pipeline.handoffs import Manifest, SampleReport, SkippedFile, UnlabeledKey
from pipeline.hashing import sha256_bytes
from pipeline.model.errors import ImageDecodeError
from pipeline.model.imaging import load_image
from pipeline.progress import progress

log = logging.getLogger(__name__)

class SampleError(PipelineError, ValueError):
    """The sample cannot be drawn as configured (too large, unknown class, ...)."""


@dataclass
class Checker:
    """Decodes candidates once, remembering which files are unreadable and why, and the
    sha256 of the bytes of those that are readable."""

    root: Path
    image_size: int
    skipped: list[SkippedFile] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    checked: int = 0
    _bar: Any = None  # the progress bar of the draw, while it runs

    def __call__(self, rel: str, split: str) -> bool:
        self.checked += 1
        if self._bar is not None:
            self._bar.update(1)
        try:
            data = (self.root / rel).read_bytes()
            load_image(data, min_side=self.image_size)
        except OSError as exc:
            reason = f"cannot open ({exc.strerror or exc})"
        except ImageDecodeError as exc:
            reason = str(exc).split(": ", 1)[-1]
        else:
            self.digests[rel] = sha256_bytes(data)
            return True
        self.skipped.append(SkippedFile(path=rel, split=split, reason=reason))
        log.warning("skipping %s: %s", rel, reason)
        return False


def choose_classes(available: list[str], spec: str | int | tuple[str, ...]) -> list[str]:
    """Resolve ``sample.classes`` ('all', the first N, or a list) against what exists."""
    if spec == "all":
        return list(available)
    if isinstance(spec, int):
        if spec > len(available):
            raise SampleError(
                f"sample.classes={spec}, but the source has only {len(available)} classes"
            )
        return list(available[:spec])
    missing = [c for c in spec if c not in available]
    if missing:
        raise SampleError(
            f"sample.classes: unknown class(es) {missing}; available: {', '.join(available)}"
        )
    return list(spec)


def _quotas(n: int, classes: list[str], rng: np.random.Generator) -> dict[str, int]:
    """Equal shares of ``n``; the remainder goes to a seeded random choice of classes."""
    base, extra = divmod(n, len(classes))
    lucky = set(rng.choice(len(classes), size=extra, replace=False).tolist()) if extra else set()
    return {c: base + (1 if i in lucky else 0) for i, c in enumerate(classes)}


def draw_stratified(
    candidates: pd.DataFrame,
    n: int,
    classes: list[str],
    rng: np.random.Generator,
    is_ok: Callable[[str], bool],
    what: str,
) -> pd.DataFrame:
    """Draw ``n`` rows, per-class counts differing by at most one where the classes allow.

    Hand-written rather than sklearn's ``train_test_split(stratify=...)``: that gives
    proportional (not equal) shares and cannot replace a file that fails to decode with
    another of the same class. Candidates are visited in seeded random order; ``is_ok`` is
    called on each before it is taken.
    """
    pools = {
        c: list(rng.permutation(candidates.loc[candidates["label"] == c, "path"].to_numpy()))
        for c in classes
    }
    available = sum(len(p) for p in pools.values())
    if n > available:
        per_class = ", ".join(f"{c}: {len(p)}" for c, p in pools.items())
        raise SampleError(
            f"{what}: asked for {n} images but the {len(classes)} chosen classes hold only "
            f"{available} ({per_class}). Lower the size or choose more classes."
        )
    quotas = _quotas(n, classes, rng)
    taken: dict[str, list[str]] = {c: [] for c in classes}

    def take_one(c: str) -> bool:
        while pools[c]:
            rel = pools[c].pop(0)
            if is_ok(rel):
                taken[c].append(rel)
                return True
        return False

    for c in classes:
        while len(taken[c]) < quotas[c] and take_one(c):
            pass
    # Classes that ran short (too few readable files): spread the deficit round-robin over
    # the classes that still have candidates, smallest first, to stay as even as possible.
    deficit = n - sum(len(t) for t in taken.values())
    while deficit > 0:
        open_classes = sorted((c for c in classes if pools[c]), key=lambda c: len(taken[c]))
        if not open_classes:
            raise SampleError(
                f"{what}: asked for {n} images but only {n - deficit} readable ones exist "
                "in the chosen classes (see the skipped files in reports/sample.json)."
            )
        for c in open_classes:
            if deficit and take_one(c):
                deficit -= 1
    rows = [(p, c) for c in classes for p in taken[c]]
    return pd.DataFrame(rows, columns=["path", "label"])


def readable(candidates: pd.DataFrame, classes: list[str],
             is_ok: Callable[[str], bool]) -> pd.DataFrame:
    """Every candidate of ``classes`` that ``is_ok`` accepts (``sample.size: all``)."""
    rows = [(rel, c) for c in classes
            for rel in candidates.loc[candidates["label"] == c, "path"] if is_ok(rel)]
    return pd.DataFrame(rows, columns=["path", "label"])


def _manifest(df: pd.DataFrame, classes: list[str], digests: dict[str, str]) -> pd.DataFrame:
    index = {c: i for i, c in enumerate(classes)}
    out = df.assign(class_index=df["label"].map(index).astype(int),
                    sha256=df["path"].map(digests))
    return out.sort_values(["class_index", "path"], ignore_index=True)[list(Manifest.columns)]


@dataclass(frozen=True)
class SampleResult:
    sample: Manifest
    test: Manifest
    unlabeled_key: UnlabeledKey  # neutral file names -> label and source path
    report: SampleReport


@dataclass(frozen=True)
class Drawn:
    """The three draws of :func:`draw_lists`, and the generator that made them (it goes on
    to name the unlabeled files)."""

    sample: pd.DataFrame  # path, label
    test: pd.DataFrame
    unlabeled: pd.DataFrame
    rng: np.random.Generator


def draw_lists(index: pd.DataFrame, available_classes: list[str], cfg: SampleConfig,
               is_ok: Callable[[str, str], bool]) -> Drawn:
    """The train sample, test set and unlabeled inputs as ``cfg`` draws them from ``index``;
    ``is_ok(path, split)`` is asked of each candidate before it is taken (the order of the
    draws, and so the result, depends only on the index, ``cfg`` and those answers)."""
    classes = choose_classes(available_classes, cfg.classes)
    rng = np.random.default_rng(cfg.seed)
    index = index[index["label"].isin(classes)]
    train_list = index[index["split"] == "train"]
    test_list = index[index["split"] == "test"]
    refused: set[str] = set()

    def ok(split: str) -> Callable[[str], bool]:
        def check(path: str) -> bool:
            if is_ok(path, split):
                return True
            refused.add(path)
            return False

        return check

    unlabeled_what = "sample.unlabeled_size (drawn from the test list, apart from the test set)"
    no_images = pd.DataFrame(columns=["path", "label"])
    if cfg.size == ALL:
        sample = readable(train_list, classes, ok("train"))
    else:
        sample = draw_stratified(train_list, cfg.size, classes, rng, ok("train"), "sample.size")
    if cfg.test_size == ALL:  # the unlabeled inputs first: the test set is all the rest
        unlabeled = draw_stratified(
            test_list, cfg.unlabeled_size, classes, rng, ok("unlabeled"), unlabeled_what,
        ) if cfg.unlabeled_size else no_images
        rest = test_list[~test_list["path"].isin(set(unlabeled["path"]) | refused)]
        test = readable(rest, classes, ok("test"))
    else:
        test = draw_stratified(test_list, cfg.test_size, classes, rng, ok("test"),
                               "sample.test_size")
        rest = test_list[~test_list["path"].isin(set(test["path"]) | refused)]
        unlabeled = draw_stratified(
            rest, cfg.unlabeled_size, classes, rng, ok("unlabeled"), unlabeled_what,
        ) if cfg.unlabeled_size else no_images
    return Drawn(sample, test, unlabeled, rng)


def drawn_paths(index: pd.DataFrame, available_classes: list[str], cfg: SampleConfig
                ) -> set[str]:
    """Every path ``sample`` will draw from ``index`` when each file is readable (what the
    demo source generates: nothing more)."""
    d = draw_lists(index, available_classes, cfg, lambda path, split: True)
    return {*d.sample["path"], *d.test["path"], *d.unlabeled["path"]}


def check_demo_draw(root: Path, index: pd.DataFrame, available_classes: list[str],
                    cfg: SampleConfig) -> None:
    """The demo source holds only the photos of one draw: a SampleError that says what to run
    when ``cfg`` draws photos it does not hold (the sample parameters changed and `prepare`
    did not run again, e.g. `dvc repro --single-item sample`)."""
    missing = sorted(p for p in drawn_paths(index, available_classes, cfg)
                     if not (root / p).is_file())
    if missing:
        raise SampleError(
            f"{root} holds the demo photos of another draw: {len(missing)} of the photos "
            f"these sample parameters draw are not there (e.g. {missing[0]}). The demo "
            "writes only the photos `sample` draws, so `prepare` runs again when the sample "
            "parameters change: run `dvc repro` (not `dvc repro --single-item sample`)."
        )


def draw_sample(
    root: Path,
    index: pd.DataFrame,
    available_classes: list[str],
    cfg: SampleConfig,
    image_size: int,
) -> SampleResult:
    """Draw the train sample, the test set and the unlabeled predict inputs.

    The unlabeled images get neutral, shuffled names (``img_00001.<ext>``); their labels go to
    the answer key only (the caller copies the images under those names).
    """
    start = time.perf_counter()
    check = Checker(root, image_size)
    classes = choose_classes(available_classes, cfg.classes)
    chosen = index[index["label"].isin(classes)]
    total = ((int((chosen["split"] == "train").sum()) if cfg.size == ALL else cfg.size)
             + (int((chosen["split"] == "test").sum()) if cfg.test_size == ALL
                else cfg.test_size + cfg.unlabeled_size))
    with progress(total, "decode+check") as bar:
        check._bar = bar
        drawn = draw_lists(index, available_classes, cfg, check)
        check._bar = None
    seconds = time.perf_counter() - start
    sample, test, unlabeled, rng = drawn.sample, drawn.test, drawn.unlabeled, drawn.rng

    order = rng.permutation(len(unlabeled))
    key_rows = []
    for n, i in enumerate(order, start=1):
        rel, label = unlabeled.iloc[i]["path"], unlabeled.iloc[i]["label"]
        key_rows.append({"file": f"img_{n:05d}{Path(rel).suffix.lower()}", "label": label,
                         "source_path": rel})
    key = pd.DataFrame(key_rows, columns=["file", "label", "source_path"])

    sample_m = _manifest(sample, classes, check.digests)
    test_m = _manifest(test, classes, check.digests)

    def per_class(df: pd.DataFrame) -> dict[str, int]:
        return {c: int(n) for c, n in df["label"].value_counts().reindex(classes).fillna(0)
                .astype(int).items()}

    report = SampleReport(
        root=str(root),
        classes=tuple(classes),
        counts={"sample": len(sample_m), "test": len(test_m), "unlabeled": len(key)},
        per_class={"sample": per_class(sample_m), "test": per_class(test_m)},
        checked_images=check.checked,
        skipped_count=len(check.skipped),
        skipped=tuple(check.skipped),
    )  # no timings here: train depends on this file, which must not change when nothing did
    log.info(
        "sampled %d train-list / %d test-list / %d unlabeled images of %d classes; "
        "%d unreadable skipped; %.1f s (%.0f img/s)",
        len(sample_m), len(test_m), len(key), len(classes), len(check.skipped), seconds,
        check.checked / seconds if seconds else 0,
    )
    return SampleResult(Manifest(sample_m), Manifest(test_m), UnlabeledKey(key), report)


def split_sample(sample: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified, seeded train/validation split of the sample manifest (scikit-learn)."""
    from sklearn.model_selection import train_test_split

    counts = sample["label"].value_counts()
    n_val = int(np.ceil(cfg.val_fraction * len(sample)))
    if counts.min() < 2 or n_val < len(counts) or len(sample) - n_val < len(counts):
        raise SampleError(
            f"split.val_fraction={cfg.val_fraction}: cannot stratify {len(sample)} images of "
            f"{len(counts)} classes (smallest class: {counts.min()}); every class needs an "
            "image on both sides. Raise sample.size or change split.val_fraction."
        )
    train, val = train_test_split(
        sample, test_size=cfg.val_fraction, stratify=sample["label"], random_state=cfg.seed
    )
    order = ["class_index", "path"]
    return (
        train.sort_values(order, ignore_index=True),
        val.sort_values(order, ignore_index=True),
    )
