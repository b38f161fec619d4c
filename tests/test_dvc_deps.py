"""dvc.yaml's code deps are the import closure of each stage's module: a module a stage runs
but does not list would let DVC skip a re-run after that module changed.

The closure is computed from the code (ast), so it stays right when modules move: for each
stage, start from ``stages/<name>.py`` (its ``cmd`` is ``python -m stages.<name>``), follow
every ``import`` / ``from ... import`` into ``pipeline/`` and ``stages/`` (in function bodies
too: a lazy import runs as well), the ``__init__.py`` of every package on the way, and every
string that names one of our modules (``python -m pipeline.x`` in a subprocess,
``importlib.import_module``). Each module found must be a file dep of the stage or lie in a
folder dep (``pipeline/model``).
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO

ROOTS = ("pipeline", "stages")

# Modules that change no result of any stage, so that editing them must not re-run one.
ALLOWED = {
    # Progress bars and their log lines: what a person watches, never an output.
    "pipeline/progress.py",
    # Exception classes (names, base classes, the user-error tuple): what a failed stage says
    # and its exit code. A stage that finishes writes the same outputs; which errors a stage
    # catches or skips is decided in the module that catches them, which is a dep.
    "pipeline/errors.py",
    "pipeline/model/errors.py",
    # SIGTERM/Ctrl-C as KeyboardInterrupt and the sections a stop waits for: how a stage
    # stops, never what a finished stage wrote.
    "pipeline/signals.py",
}


def _is_docstring_only(path: Path) -> bool:
    """A package ``__init__.py`` with nothing but a docstring runs no code: no dep needed."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
               for node in body)


def module_file(name: str, repo: Path = REPO) -> Path | None:
    """``pipeline.x.y`` -> its file (``.py``, or the package's ``__init__.py``), if it is ours."""
    if name.split(".")[0] not in ROOTS:
        return None
    base = repo.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None  # not a module (a name defined in one), or a namespace folder: nothing runs


def _package_of(path: Path, repo: Path) -> list[str]:
    """The package a relative import in ``path`` starts from."""
    parts = list(path.relative_to(repo).parent.parts)
    return parts


def imported_modules(path: Path, repo: Path = REPO) -> set[str]:
    """The dotted names of our modules that ``path`` imports or names (see the docstring)."""
    names: set[str] = set()
    package = _package_of(path, repo)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            # `from pipeline.x import y`: y is a submodule, or a name defined in pipeline.x
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and re.fullmatch(r"(pipeline|stages)(\.\w+)+", node.value)):
            names.add(node.value)
    out = set()
    for name in names:
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in out if module_file(n, repo) is not None}


def closure(stage_module: str, repo: Path = REPO) -> dict[str, list[str]]:
    """Every module of ours that ``stage_module`` runs -> one import chain that reaches it."""
    chains = {stage_module: [stage_module]}
    todo = [stage_module]
    while todo:
        current = todo.pop()
        for name in sorted(imported_modules(module_file(current, repo), repo)):
            if name not in chains:
                chains[name] = chains[current] + [name]
                todo.append(name)
    return chains


def _dep_paths(stage: dict) -> list[str]:
    deps = []
    for dep in stage.get("deps", []):
        deps.append(next(iter(dep)) if isinstance(dep, dict) else dep)
    return [d.rstrip("/") for d in deps]


def uncovered(dvc: dict, repo: Path = REPO) -> list[str]:
    """One message per module a stage runs but does not list (nor an allowed one)."""
    problems = []
    for stage_name, stage in dvc["stages"].items():
        match = re.search(r"-m (stages\.\w+)", stage["cmd"])
        assert match, f"stage {stage_name!r}: cmd {stage['cmd']!r} is not `-m stages.<name>`"
        deps = _dep_paths(stage)
        for name, chain in sorted(closure(match.group(1), repo).items()):
            path = module_file(name, repo)
            rel = path.relative_to(repo).as_posix()
            if rel in ALLOWED or (path.name == "__init__.py" and _is_docstring_only(path)):
                continue
            if any(rel == d or rel.startswith(d + "/") for d in deps):
                continue
            problems.append(f"stage {stage_name!r} runs {rel} (imported via "
                            f"{' -> '.join(chain)}) but its deps do not list it: add "
                            f"`- {rel}` to its deps in dvc.yaml (or a folder that holds it)")
    return problems


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_runs_its_own_module_and_lists_it():
    for name, stage in dvc_yaml()["stages"].items():
        assert stage["cmd"].endswith(f"-m stages.{name}"), (name, stage["cmd"])
        assert f"stages/{name}.py" in _dep_paths(stage), name


def test_the_deps_cover_every_module_each_stage_runs():
    problems = uncovered(dvc_yaml())
    assert not problems, "\n".join(problems)


def test_the_deps_list_no_module_that_no_longer_exists():
    for name, stage in dvc_yaml()["stages"].items():
        for dep in _dep_paths(stage):
            if dep.startswith(ROOTS):
                assert (REPO / dep).exists(), f"stage {name!r}: dep {dep} does not exist"


@pytest.mark.parametrize(("stage", "dep"), [("train", "pipeline/config.py"),
                                            ("evaluate", "pipeline/model"),
                                            ("sample", "stages/common.py")])
def test_a_dropped_dep_is_named_with_the_stage_and_the_import_chain(stage, dep):
    """The check itself: drop one dep from a copy of dvc.yaml and it fails, naming both."""
    broken = copy.deepcopy(dvc_yaml())
    deps = broken["stages"][stage]["deps"]
    deps[:] = [d for d in deps if (next(iter(d)) if isinstance(d, dict) else d) != dep]
    problems = uncovered(broken)
    assert problems, f"dropping {dep} from {stage} went unnoticed"
    assert all(p.startswith(f"stage {stage!r} runs {dep}") for p in problems), problems
    assert f"stages.{stage}" in problems[0]


def test_the_closure_follows_lazy_imports_packages_and_module_names(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "sub").mkdir(parents=True)
    (tmp_path / "stages" / "go.py").write_text(
        "from pipeline.sub import thing\n"
        "def main():\n    from pipeline import lazy\n"
        "CMD = ['python', '-m', 'pipeline.child']\n")
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "sub" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "pipeline" / "sub" / "thing.py").write_text("from . import other\n")
    (tmp_path / "pipeline" / "sub" / "other.py").write_text("import os\n")
    (tmp_path / "pipeline" / "lazy.py").write_text("")
    (tmp_path / "pipeline" / "child.py").write_text("")
    (tmp_path / "pipeline" / "unused.py").write_text("")
    found = set(closure("stages.go", tmp_path))
    assert found == {"stages.go", "pipeline", "pipeline.sub", "pipeline.sub.thing",
                     "pipeline.sub.other", "pipeline.lazy", "pipeline.child"}
