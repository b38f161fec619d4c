"""The files passed between stages: the path of every file DVC tracks, and one typed class per
hand-off file with ``read`` and ``write``.

Only the stages and the CLI call ``read``/``write``; the library takes and returns these
objects. Reading checks the shape, so a file written by an older version of the pipeline, or
edited by hand, stops the stage with a message naming the file and the fix (re-run
``dvc repro``) instead of being half-understood. Writes are atomic (a temporary file, then a
rename): a killed stage never leaves a truncated file that a later stage trusts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd

from pipeline.config import parse, typed
from pipeline.errors import PipelineError
from pipeline.hashing import sha256_bytes

# -- every path DVC tracks (relative to the workspace a stage runs in) -------------------------

SOURCE_DIR = Path("data/source")
SOURCE_INFO = SOURCE_DIR / "source.json"
SOURCE_INDEX = SOURCE_DIR / "index.csv"
MANIFEST_DIR = Path("data/manifests")
SAMPLE_MANIFEST = MANIFEST_DIR / "sample.csv"
TRAIN_MANIFEST = MANIFEST_DIR / "train.csv"
VAL_MANIFEST = MANIFEST_DIR / "val.csv"
TEST_MANIFEST = MANIFEST_DIR / "test.csv"
UNLABELED_KEY = MANIFEST_DIR / "unlabeled_key.csv"
UNLABELED_DIR = Path("data/unlabeled")
SAMPLE_REPORT = Path("reports/sample.json")
PREPARE_REPORT = Path("reports/prepare.json")
RUN_REF = Path("reports/run.json")
PROMOTION = Path("reports/promotion.json")
CHAMPION = Path("reports/champion.json")
PER_CLASS_REPORT = Path("reports/per_class.csv")
TRAIN_METRICS = Path("metrics/train.json")
EVALUATE_METRICS = Path("metrics/evaluate.json")
PREDICT_METRICS = Path("metrics/predict.json")
TRAIN_HISTORY = Path("plots/train_history.csv")
LEARNING_CURVES = Path("plots/learning_curves.png")
CONFUSION_CSV = Path("plots/confusion.csv")
CONFUSION_PNG = Path("plots/confusion_matrix.png")
PER_CLASS_ACCURACY_CSV = Path("plots/per_class_accuracy.csv")
PER_CLASS_ACCURACY_PNG = Path("plots/per_class_accuracy.png")
WORST_PREDICTIONS_PNG = Path("plots/worst_predictions.png")
PREDICTIONS = Path("predictions/predictions.csv")


class HandoffError(PipelineError):
    """A file passed between stages is missing or not in the shape this code writes."""


def _stale(path: Path, problem: str) -> HandoffError:
    return HandoffError(
        f"{path}: {problem}. It was written by another version of the pipeline or edited by "
        "hand: re-run `dvc repro` (add `-f <stage>` if DVC thinks it is up to date)."
    )


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a file is 0644 as usual
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: dict) -> Path:
    """Pretty JSON (metrics files and hand-offs), atomically."""
    return atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def write_csv(path: Path, frame: pd.DataFrame, index: bool = False) -> Path:
    """A CSV file, atomically."""
    return atomic_write_bytes(path, frame.to_csv(index=index).encode())


def _read_text(path: Path, stage: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise HandoffError(f"{path} is missing: run `dvc repro {stage}` first") from None


# -- JSON hand-offs ------------------------------------------------------------------------

J = TypeVar("J", bound="JsonHandoff")


class JsonHandoff:
    """A frozen, typed dataclass (:func:`pipeline.config.typed`) stored as one JSON object
    with exactly its fields: reading checks them as params.yaml is checked."""

    default_path: ClassVar[Path]
    written_by: ClassVar[str]  # the stage that writes it (for "run dvc repro <stage>")

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists

    def write(self, path: Path | None = None) -> Path:
        return write_json(path or self.default_path, self.as_dict())

    @classmethod
    def read(cls: type[J], path: Path | None = None) -> J:
        path = Path(path or cls.default_path)
        data = _read_text(path, cls.written_by)
        try:
            raw = json.loads(data)
        except json.JSONDecodeError as exc:
            raise _stale(path, f"not JSON ({exc})") from exc
        try:
            return parse(cls, raw, path.stem, HandoffError)
        except HandoffError as exc:
            raise _stale(path, str(exc)) from exc


@typed
class SourceInfo(JsonHandoff):
    """``data/source/source.json``: what ``prepare`` materialised and where its images are."""

    default_path: ClassVar[Path] = SOURCE_INFO
    written_by: ClassVar[str] = "prepare"

    source: str
    root: str  # the image root; relative to the folder of this file (demo) or absolute
    classes: tuple[str, ...]
    train_images: int
    test_images: int
    fingerprint: str | None  # (path, size, mtime) hash of an external folder; None for demo
    ignored_files: int  # files in the source folder that are not images (not indexed)

    def image_root(self, info_file: Path = SOURCE_INFO) -> Path:
        root = Path(self.root)
        root = root if root.is_absolute() else (info_file.parent / root).resolve()
        if not root.is_dir():
            raise HandoffError(
                f"image root {root} (from {info_file}) does not exist: was data.root moved? "
                "Run `dvc repro -f prepare`."
            )
        return root


@typed
class SkippedFile:
    path: str
    split: str  # train | test | unlabeled: which list it was drawn from
    reason: str


@typed
class SampleReport(JsonHandoff):
    """``reports/sample.json``: the image root and class order every later stage uses, the
    counts, and every unreadable file the sample skipped, with the reason."""

    default_path: ClassVar[Path] = SAMPLE_REPORT
    written_by: ClassVar[str] = "sample"

    root: str  # relative to the workspace when inside it, else absolute
    classes: tuple[str, ...]
    counts: dict[str, int]
    per_class: dict[str, dict[str, int]]
    checked_images: int
    skipped_count: int
    skipped: tuple[SkippedFile, ...]

    def image_root(self) -> Path:
        """The image root as an existing absolute path."""
        root = Path(self.root).expanduser()
        root = root if root.is_absolute() else root.resolve()
        if not root.is_dir():
            raise HandoffError(
                f"image root {root} (from {SAMPLE_REPORT}) does not exist: run `dvc repro` "
                "(or `dvc checkout data/source` if DVC's cache holds it)."
            )
        return root


@typed
class RunRef(JsonHandoff):
    """``reports/run.json``: the MLflow run that ``train`` opened and ``evaluate``/``predict``
    continue, and the model it logged."""

    default_path: ClassVar[Path] = RUN_REF
    written_by: ClassVar[str] = "train"

    run_id: str
    run_name: str
    model_uri: str
    # the store the run lives in, without credentials ("" in files written before it was)
    tracking_uri: str = ""


@typed
class Promotion(JsonHandoff):
    """``reports/promotion.json``: the registry decision of the last ``evaluate``, either way,
    and why."""

    default_path: ClassVar[Path] = PROMOTION
    written_by: ClassVar[str] = "evaluate"

    model_name: str
    version: str
    test_accuracy: float
    test_manifest_sha256: str
    min_delta: float
    champion_version: str | None  # the champion before this decision
    champion_test_accuracy: float | None  # its accuracy on this test manifest
    decided_at: str
    promoted: bool
    reason: str
    run_id: str


@typed
class ChampionRef(JsonHandoff):
    """``reports/champion.json``: the registry version that ``predict.model`` (an alias, by
    default ``champion``) names right now. Rewritten by the always-changed ``champion``
    stage and by ``promote``/``rollback``, so that ``predict`` re-runs when it moves."""

    default_path: ClassVar[Path] = CHAMPION
    written_by: ClassVar[str] = "champion"

    model_name: str
    ref: str  # what predict.model asked for: an alias or a version number
    version: str
    run_id: str  # the run that trained that version


# -- CSV hand-offs -------------------------------------------------------------------------

C = TypeVar("C", bound="CsvHandoff")


@dataclass(frozen=True, eq=False)
class CsvHandoff:
    """A CSV table with required columns; ``sha256`` is the digest of the file's bytes."""

    columns: ClassVar[tuple[str, ...]]
    dtypes: ClassVar[dict[str, Any]] = {}
    written_by: ClassVar[str]

    frame: pd.DataFrame
    path: str = ""
    sha256: str = ""

    @classmethod
    def read(cls: type[C], path: Path) -> C:
        data = _read_text(Path(path), cls.written_by)
        try:
            frame = pd.read_csv(io.BytesIO(data), dtype=cls.dtypes)
        except (ValueError, pd.errors.ParserError) as exc:
            raise _stale(Path(path), f"not a readable CSV table ({exc})") from exc
        missing = [c for c in cls.columns if c not in frame.columns]
        if missing:
            raise _stale(Path(path), f"columns {missing} are missing (has {list(frame.columns)})")
        return cls(frame, str(path), sha256_bytes(data))

    def write(self, path: Path) -> Path:
        missing = [c for c in self.columns if c not in self.frame.columns]
        if missing:
            raise ValueError(f"{path}: the table lacks the columns {missing}")
        return write_csv(path, self.frame)


@dataclass(frozen=True, eq=False)
class SourceIndex(CsvHandoff):
    """``data/source/index.csv``: every image of the source, its class and official list."""

    columns: ClassVar[tuple[str, ...]] = ("path", "label", "split")
    dtypes: ClassVar[dict[str, Any]] = {"path": str, "label": str, "split": str}
    written_by: ClassVar[str] = "prepare"


@dataclass(frozen=True, eq=False)
class Manifest(CsvHandoff):
    """``data/manifests/{sample,train,val,test}.csv``: ``path`` (relative to the image root),
    ``label``, ``class_index`` and the ``sha256`` of the image bytes ``sample`` checked."""

    # ``sha256`` pins each image's bytes: the manifests change whenever a listed photo does,
    # so the stages after ``split`` depend on them alone and DVC never re-hashes the source.
    columns: ClassVar[tuple[str, ...]] = ("path", "label", "class_index", "sha256")
    dtypes: ClassVar[dict[str, Any]] = {"path": str, "label": str, "sha256": str}
    written_by: ClassVar[str] = "sample"


@dataclass(frozen=True, eq=False)
class UnlabeledKey(CsvHandoff):
    """``data/manifests/unlabeled_key.csv``: the answer key of ``data/unlabeled/``."""

    columns: ClassVar[tuple[str, ...]] = ("file", "label", "source_path")
    dtypes: ClassVar[dict[str, Any]] = {"file": str, "label": str, "source_path": str}
    written_by: ClassVar[str] = "sample"


def write_unlabeled(key: UnlabeledKey, image_root: Path, folder: Path = UNLABELED_DIR) -> None:
    """Copy the unlabeled images to ``folder`` under their neutral names (replacing it whole:
    a temporary folder, then a rename)."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for row in key.frame.itertuples():
        shutil.copyfile(image_root / row.source_path, tmp / row.file)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def unlabeled_files(folder: Path = UNLABELED_DIR) -> list[Path]:
    """The images of ``data/unlabeled/``, sorted by name."""
    if not Path(folder).is_dir():
        raise HandoffError(f"{folder} is missing: run `dvc repro sample` first")
    return sorted(p for p in Path(folder).iterdir() if p.is_file())
