"""Running a registered model in a fresh ``python -I`` process: the child (this module run by
path) imports nothing of this repository, the parent reads its predictions back, and a
failure names the model and the store."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from pipeline.handoffs import unlabeled_files
from pipeline.runs import run_model
from pipeline.runs.run_model import ModelRunError

CONSUMER_MODULES = {"json", "os", "sys", "subprocess", "tempfile", "collections", "pathlib",
                    "__future__", "mlflow", "pandas", "torch"}


def _parent_block(node: ast.stmt) -> bool:
    """``if __name__ != "__main__":``: what only the parent (the imported module) runs."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and isinstance(node.test.ops[0], ast.NotEq))


def test_the_child_imports_only_what_a_consumer_has():
    """Run by path, the module executes its top level and main(): no import of this
    repository there (it would shadow the code the model carries)."""
    tree = ast.parse(open(run_model.__file__).read())
    child = [n for n in tree.body if not _parent_block(n) and not isinstance(n, ast.FunctionDef)]
    child += [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    imported = set()
    for node in (n for top in child for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= CONSUMER_MODULES, imported - CONSUMER_MODULES
    assert "pipeline" not in imported
    assert any(_parent_block(n) for n in tree.body)  # the parent's imports are apart


@pytest.mark.slow  # a fresh interpreter that imports torch and MLflow
def test_a_model_that_cannot_run_names_itself_and_the_store(mlflow_store, tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(b"not even an image")
    with pytest.raises(ModelRunError) as err:
        run_model.predict_files("models:/nothing-here/1", [image])
    msg = str(err.value)
    assert "running models:/nothing-here/1" in msg and mlflow_store in msg
    assert "in a fresh process failed (exit 1)" in msg
    assert "nothing-here" in msg.split("\n", 1)[1]  # the child's own error, at the end


@pytest.mark.slow  # two fresh processes
def test_batch_size_changes_nothing_but_speed(champion_store):
    c = champion_store
    files = unlabeled_files(c.data.unlabeled)
    uri = f"models:/{c.name}@champion"
    one = run_model.predict_files(uri, files, batch_size=1)
    many = run_model.predict_files(uri, files, batch_size=64)
    assert one["label"].tolist() == many["label"].tolist()
    assert one["confidence"].tolist() == pytest.approx(many["confidence"].tolist(), abs=1e-5)


def test_the_child_is_this_file_run_by_path(monkeypatch, mlflow_store, tmp_path):
    """What the parent starts: ``python -I <run_model.py>`` in an empty folder."""
    started = []

    class Stop(Exception):
        pass

    def popen(args, **kwargs):
        started.append((args, kwargs["cwd"]))
        raise Stop

    monkeypatch.setattr(run_model.subprocess, "Popen", popen)
    with pytest.raises(Stop):
        run_model.predict_files("models:/m/1", [tmp_path / "a.jpg"])
    (args, cwd), = started
    assert args == [sys.executable, "-I", run_model.__file__]
    assert cwd != str(tmp_path) and "food101-predict-" in cwd


def test_a_local_version_is_loaded_from_its_folder(champion_store, monkeypatch):
    """The child opens no store for a version of a local one: it gets the folder that the
    version's ``models:/`` URI resolves to. Aliases, versions that do not exist and servers
    go through as they are (the child resolves them, or says what is missing)."""
    c = champion_store
    version = c.evaluated.decision.version
    folder = run_model.load_uri(f"models:/{c.name}/{version}")
    assert folder.startswith("file://")
    assert (Path(folder.removeprefix("file://")) / "MLmodel").is_file()
    for uri in (f"models:/{c.name}@champion", f"models:/{c.name}/999", "runs:/abc/model"):
        assert run_model.load_uri(uri) == uri
    monkeypatch.setattr(run_model, "is_local_store", lambda: False)  # a tracking server
    assert run_model.load_uri(f"models:/{c.name}/{version}") == f"models:/{c.name}/{version}"
