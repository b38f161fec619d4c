"""The shape of the code (ARCHITECTURE.md), checked: which modules talk to MLflow, that the
model package is self-contained, that imports only point down, and that only the stages and
the CLI read or write the files passed between stages."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

PIPELINE = REPO / "pipeline"
MLFLOW_MODULES = {"pipeline/runs/store.py", "pipeline/runs/tracking.py",
                  "pipeline/runs/registry.py", "pipeline/runs/lock.py",
                  "pipeline/runs/run_model.py", "pipeline/model/pyfunc.py"}

# Each module's layer: a module may import only modules of a lower layer (ARCHITECTURE.md).
LAYERS = {
    "pipeline.model.errors": 0,
    "pipeline.model.imaging": 1,
    "pipeline.model.devices": 1,
    "pipeline.model.presets": 2,
    "pipeline.model.network": 3,
    "pipeline.model.weights": 4,
    "pipeline.model.card": 4,
    "pipeline.model.inference": 5,
    "pipeline.model.pyfunc": 6,
    "pipeline.errors": 7,
    "pipeline.hashing": 7,
    "pipeline.paths": 7,
    "pipeline.signals": 7,
    "pipeline.progress": 7,
    "pipeline.config": 8,
    "pipeline.services": 8,
    "pipeline.handoffs": 9,
    "pipeline.compute": 9,
    "pipeline.distributed": 10,
    "pipeline.data.drawing": 1,
    "pipeline.data.demo": 10,
    "pipeline.features.cache": 10,
    "pipeline.features.compiling": 10,
    "pipeline.evaluation": 10,
    "pipeline.plots": 10,
    "pipeline.data.sources": 12,  # the demo writes what sampling will draw
    "pipeline.data.sampling": 11,
    "pipeline.features.extract": 11,
    "pipeline.features.scoring": 12,
    "pipeline.loop": 11,
    "pipeline.training": 12,
    "pipeline.runs.store": 12,
    "pipeline.runs.notes": 12,
    "pipeline.runs.spec": 13,
    "pipeline.runs.lock": 13,
    "pipeline.runs.run_model": 13,
    "pipeline.runs.tracking": 14,
    "pipeline.runs.registry": 14,
    "pipeline.jobs.train": 15,
    "pipeline.jobs.evaluate": 15,
    "pipeline.jobs.predict": 15,
    "pipeline.cli": 16,
    "pipeline.team": 16,
    "pipeline.__main__": 17,
}
PACKAGES = {"pipeline", "pipeline.model", "pipeline.data", "pipeline.runs", "pipeline.jobs",
            "pipeline.features"}
HANDOFF_CLASSES = {"SourceInfo", "SourceIndex", "SampleReport", "RunRef", "Promotion",
                   "Manifest", "UnlabeledKey"}
HANDOFF_WRITERS = {"write_json", "write_csv", "atomic_write_bytes", "write_unlabeled",
                   "unlabeled_files"}
TRACKED_PREFIXES = ("data/", "reports/", "metrics/", "plots/", "predictions/")


def _modules(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py")
                  if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _module_of(target: str) -> str | None:
    """The module with a layer that ``target`` (a module or a name in it) belongs to."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return ".".join(parts[:i])
    return None


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_only_the_run_plumbing_and_the_pyfunc_import_mlflow():
    pattern = re.compile(r"^\s*(import|from) mlflow", re.MULTILINE)
    by_regex = {_rel(p) for p in _modules("pipeline", "stages") if pattern.search(p.read_text())}
    by_ast = {_rel(p) for p in _modules("pipeline", "stages")
              if any(m == "mlflow" or m.startswith("mlflow.") for m in _imports(p))}
    assert by_regex == by_ast == MLFLOW_MODULES


def test_every_module_has_a_layer():
    names = {_name(p) for p in _modules("pipeline") if p.name != "__init__.py"}
    assert names == set(LAYERS), "place new modules in LAYERS and in ARCHITECTURE.md"


@pytest.mark.parametrize("path", _modules("pipeline"), ids=_rel)
def test_imports_point_down(path):
    if path.name == "__init__.py":
        assert not [m for m in _imports(path) if m.startswith("pipeline")]
        return
    own = LAYERS[_name(path)]
    for target in _imports(path):
        if not target.startswith("pipeline") or target in PACKAGES:
            continue  # `from pipeline.runs import tracking` is checked as pipeline.runs.tracking
        module = _module_of(target)
        assert module, f"{_rel(path)} imports {target}, which has no layer"
        assert LAYERS[module] < own, (
            f"{_rel(path)} (layer {own}) imports {module} (layer {LAYERS[module]})")


def test_the_model_package_imports_nothing_else_of_the_pipeline():
    for path in _modules("pipeline/model"):
        outside = [m for m in _imports(path)
                   if m.startswith("pipeline") and not m.startswith("pipeline.model")]
        assert outside == [], _rel(path)


def test_no_import_fallbacks():
    for path in _modules("pipeline", "stages"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                assert not names & {"ImportError", "ModuleNotFoundError"}, _rel(path)


def test_only_stages_and_the_cli_read_or_write_the_files_between_stages():
    allowed = {"pipeline/handoffs.py", "pipeline/cli.py"}
    for path in _modules("pipeline"):
        if _rel(path) in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Attribute) and f.attr in ("read", "write")
                        and isinstance(f.value, ast.Name) and f.value.id in HANDOFF_CLASSES):
                    pytest.fail(f"{_rel(path)}:{node.lineno} calls {f.value.id}.{f.attr}")
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                assert called not in HANDOFF_WRITERS, f"{_rel(path)}:{node.lineno} {called}"
                if (called in ("Path", "open") and node.args
                        and isinstance(node.args[0], ast.Constant)
                        and str(node.args[0].value).startswith(TRACKED_PREFIXES)):
                    pytest.fail(f"{_rel(path)}:{node.lineno} opens {node.args[0].value}")


def test_stages_are_thin():
    for path in _modules("stages"):
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))], \
            f"{_rel(path)}: loops belong in the library"
        if path.stem not in ("__init__", "common"):
            assert ast.get_docstring(tree), f"{_rel(path)} says its inputs and outputs"
            assert len(path.read_text().splitlines()) <= 45, _rel(path)


@pytest.mark.slow  # a fresh interpreter
def test_evaluate_imports_no_torchvision_until_it_builds_a_backbone():
    """Importing torchvision costs ~1.1 s a process (it imports torch._dynamo): `evaluate`
    of a head-only experiment, whose features are all cached, builds no backbone and must
    not pay it (pipeline/model/network.py)."""
    code = ("import sys, stages.evaluate, pipeline.model.presets, pipeline.model.card; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
