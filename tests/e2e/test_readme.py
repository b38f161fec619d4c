"""The documented commands, typed as written, in a fresh clone after `make run`.

Each code block after a ``<!-- tested: NAME -->`` line in README.md or docs/*.md runs in a new
shell with a clean environment (no venv on PATH, no MLFLOW_* variables, a fresh HOME), both
ways the README promises: after `source .venv/bin/activate`, and with the `.venv/bin/`
prefix. A test types each block by its NAME, wherever the block lives. The long-running
ones (`make ui`, `mlflow models serve`) are started, probed over HTTP and stopped. The clone
gets tiny params (committed, so they are its baseline) and a `.venv` that borrows this test's
virtualenv without rebuilding or redirecting it.

What the test changes in a command, and why: ports (free ones instead of 5000/5001), and
the values of `dvc exp run -S` the second time (the same values would be restored from
DVC's run-cache without running a stage, so the prefix way would prove nothing).

The fast tests read the pages only: every marked block has a test, every relative link
resolves, every `-S key=` and `make <target>` names what params.yaml and the Makefile have,
and docs/parameters.md lists every key of params.yaml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import yaml
from helpers import (
    COMMITTED_FILES,
    REPO,
    TINY_PROJECT,
    committed_text,
    free_port,
    printed_links,
    stop_group,
    wait_for_http,
)

WAYS = ("activated", "prefix")
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
START_WAIT = 180  # seconds for `make ui` / `mlflow models serve` to answer
YEAR_2000 = 946_684_800


# -- the pages, read the way a person reads them ----------------------------------------------

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Every marked block, by name: what the slow tests below type. A new marked block needs a test.
TESTED = {"everyday", "ui", "serve", "load"}
MARKER = re.compile(r"<!-- tested(?::\s*([\w-]+))?\s*-->\n(```(\w+)\n(.*?)```)?", re.S)


def _commands_of(lang: str, body: str) -> list[str]:
    """The commands of a block: comments dropped, continuation lines joined, the venv's
    activation line left out (a way, not a command); a python block is one command."""
    if lang == "python":
        return [body]
    commands, pending = [], ""
    for raw in body.splitlines():
        line = re.sub(r"\s{2,}#.*$", "", raw).rstrip()  # a trailing comment
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        command = (pending + line.strip()).strip()
        pending = ""
        if command != "source .venv/bin/activate":
            commands.append(command)
    return commands


def marked_blocks() -> list[tuple[Path, str | None, str | None, list[str]]]:
    """(page, name, language, commands) of every ``<!-- tested: NAME -->`` marker in README.md
    and docs/*.md; name or language is None where the marker is malformed."""
    out = []
    for page in PAGES:
        for m in MARKER.finditer(page.read_text()):
            name, lang, body = m.group(1), m.group(3), m.group(4)
            out.append((page, name, lang, _commands_of(lang, body) if lang else []))
    return out


def blocks_by_name() -> dict[str, tuple[str, list[str]]]:
    """name -> (language, commands) of every marked block, wherever it lives."""
    return {name: (lang, commands) for _, name, lang, commands in marked_blocks()}


def test_every_marked_block_has_a_name_and_a_test():
    marked = marked_blocks()
    where = [(page.name, name, lang) for page, name, lang, _ in marked]
    assert all(name and lang for _, name, lang in where), where  # `<!-- tested: NAME -->` + ```
    names = [name for _, name, _ in where]
    assert sorted(names) == sorted(TESTED), where  # each name once; none without a test
    assert all(commands for *_, commands in marked), where


def test_the_readme_blocks_hold_the_everyday_commands():
    commands = [c for _, cs in blocks_by_name().values() for c in cs]
    for expected in ("dvc exp run -S train.lr=", "dvc exp run --temp", "dvc exp show",
                     "dvc metrics show", "make plots", "python -m pipeline versions",
                     "python -m pipeline promote", "python -m pipeline rollback",
                     "python -m pipeline predict", "make ui", "mlflow models serve", "curl "):
        assert any(c.startswith(expected) or f" {expected}" in c for c in commands), expected
    readme = {name for page, name, *_ in marked_blocks() if page.name == "README.md"}
    assert {"everyday", "ui", "load"} <= readme  # the serving block lives in docs/handoff.md


def _without_code(page: Path) -> str:
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.S)


def _links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _without_code(page))


def _anchors(page: Path) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#{1,6}\s+(.*?)\s*$", _without_code(page), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves():
    assert (REPO / "docs").is_dir() and len(PAGES) > 1
    checked = 0
    for page in PAGES:
        for link in _links(page):
            if re.match(r"[a-z]+:", link):  # https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            assert target.is_file(), f"{page.name}: {link} -> {target} is not a file"
            if anchor and target.suffix == ".md":
                assert anchor in _anchors(target), f"{page.name}: {link}: no such heading"
            checked += 1
    assert checked >= len(PAGES)


def test_the_readme_links_every_page_of_docs():
    linked = {(REPO / link.partition("#")[0]).resolve() for link in _links(REPO / "README.md")}
    assert set(PAGES[1:]) <= linked


def _params_keys() -> set[str]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return {f"{section}.{key}" for section, values in params.items() for key in values}


def test_every_set_param_is_a_key_of_params_yaml():
    """`-S key=value` anywhere in the pages names a key params.yaml has: no moved spelling
    (`train.device` is `compute.device` now) and no typo."""
    keys = _params_keys()
    assert "compute.device" in keys and "train.device" not in keys
    found = 0
    for page in PAGES:
        for key in re.findall(r"-S\s+([\w.]+)=", page.read_text()):
            assert key in keys, f"{page.name}: -S {key}=... is not a key of params.yaml"
            found += 1
    assert found >= 10


def test_no_command_uses_a_moved_train_key():
    moved = r"train\.(device|nproc|num_workers|feature_batch_size|compile)\b"
    for page in PAGES:
        for block in re.findall(r"```\w*\n(.*?)```", page.read_text(), re.S):
            assert not re.search(moved, block), (page.name, block)


def _shell_lines(page: Path) -> list[str]:
    """What a page gives to type: code block lines (comments dropped) and inline code."""
    text = page.read_text()
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip()
             for block in re.findall(r"```\w*\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    inline = re.findall(r"`([^`\n]+)`", _without_code(page))
    return [line for line in lines + inline if line]


def test_every_make_target_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    found = 0
    for page in PAGES:
        for line in _shell_lines(page):
            for target in re.findall(r"(?:^|[;&|]\s*)make ([a-z][\w-]*)", line):
                assert target in targets, f"{page.name}: `make {target}` is not in the Makefile"
                found += 1
    assert found >= 8


def test_parameters_page_lists_every_key():
    page = (REPO / "docs" / "parameters.md").read_text()
    missing = sorted(k for k in _params_keys() if f"| `{k}` |" not in page)
    assert not missing, f"docs/parameters.md lacks {missing}"


def typed(command: str, way: str) -> str:
    """The shell line a person types: after activating, or with the `.venv/bin/` prefix
    (`mlflow models serve` starts `uvicorn` by name: the README puts the venv's bin/ on
    PATH for it instead)."""
    if way == "activated":
        return f"source .venv/bin/activate && {command}"
    if command.startswith(("dvc ", "python ")):
        return f".venv/bin/{command}"
    if re.match(r"(\w+=\S+\s+)*mlflow ", command):
        return f"PATH=$PWD/.venv/bin:$PATH {command}"
    return command


def other_values(command: str) -> str:
    """`-S key=value` with another value (0.001 -> 0.002, 5 -> 6)."""
    def bump(m: re.Match) -> str:
        value = m.group(2)
        new = str(int(value) + 1) if value.isdigit() else f"{float(value) * 2:g}"
        return f"{m.group(1)}{new}"

    return re.sub(r"(-S [\w.]+=)([\d.]+)", bump, command)


# -- a fresh clone, as a new user has it after `make run` --------------------------------------

def _editable_mapping() -> str:
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    finders = list((site / "site-packages").glob("__editable___food101_pipeline_*_finder.py"))
    return "\n".join(line for f in finders for line in f.read_text().splitlines()
                     if line.startswith("MAPPING"))


def _borrowed_venv(clone: Path) -> None:
    """clone/.venv: this test's venv (bin/, lib/ linked) with a stamp of its own, newer than
    the clone's pyproject.toml, so `make` neither rebuilds nor re-points the real venv."""
    venv = clone / ".venv"
    venv.mkdir()
    for name in ("bin", "lib", "lib64", "include"):
        if (Path(sys.prefix) / name).exists():
            (venv / name).symlink_to(Path(sys.prefix) / name)
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    os.utime(clone / "pyproject.toml", (YEAR_2000, YEAR_2000))
    (venv / ".installed").touch()


def _sh(clone: Path, env: dict, line: str, timeout: float = 900) -> str:
    proc = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"`{line}` failed ({proc.returncode}):\n" \
        f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    mapping = _editable_mapping()
    root = tmp_path_factory.mktemp("readme")
    repo, home = root / "clone", root / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = New User\n\temail = new@user.local\n")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)  # keeps stages/python executable
    for rel in COMMITTED_FILES:  # not what the last `dvc exp run` left in the workspace
        (repo / rel).write_text(committed_text(rel))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY_PROJECT.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {"HOME": str(home), "PATH": CLEAN_PATH, "LANG": "C.UTF-8", "TERM": "dumb"}
    _sh(repo, env, "git init -q -b main && git add -A && git commit -qm 'a fresh clone'")
    _borrowed_venv(repo)
    template = REPO / ".cache" / "dvc-plots-offline.html"  # vega from npm: no network here
    (repo / ".cache").mkdir()
    if template.is_file():
        shutil.copy(template, repo / ".cache" / template.name)
    else:
        (repo / ".cache" / template.name).write_text("<html><body>{plot_divs}</body></html>")
    out = _sh(repo, env, "make run")
    yield repo, env, out
    assert _editable_mapping() == mapping, "the test re-pointed the real venv's install"


def _client(repo: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{repo}/mlruns/mlflow.db"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_names(repo: Path) -> list[str]:
    client = _client(repo)
    exp = client.get_experiment_by_name("food101")
    return [r.info.run_name for r in client.search_runs([exp.experiment_id])]


def _commands(name: str) -> list[str]:
    return blocks_by_name()[name][1]


@pytest.mark.slow
def test_make_run_ends_with_a_champion(clone):
    repo, _, out = clone
    assert "Running stage 'evaluate'" in out
    champion = _client(repo).get_model_version_by_alias("food101-resnet50", "champion")
    assert str(champion.version) == "1"
    assert (repo / "plots" / "worst_predictions.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_everyday_commands(clone, way):
    repo, env, _ = clone
    classes = {d.name for d in (repo / "data" / "source" / "images").iterdir()}
    for command in _commands("everyday"):
        if way == "prefix" and command.startswith("dvc exp run"):
            command = other_values(command)
        before = _run_names(repo)
        out = _sh(repo, env, typed(command, way))
        if command.startswith("dvc exp run"):
            change = re.search(r"-S [\w.]+\.(\w+=[\d.]+)", command).group(1)
            new = list((Counter(_run_names(repo)) - Counter(before)).elements())
            # one new MLflow run, named after what differs from the committed params
            assert len(new) == 1 and change in new[0].split(": ")[-1].split(), (command, new)
        elif command.startswith("dvc exp show"):
            assert "test_accuracy" in out
        elif command.startswith("dvc metrics show"):
            assert "test_top5_accuracy" in out and "metrics/predict.json" in out
        elif command == "make plots":
            page = (repo / "dvc_plots" / "index.html").read_text()
            assert "Per-class accuracy" in page and "worst_predictions.png" in page
        elif command.endswith(" versions"):
            assert "champion" in out and "test_accuracy" in out
        elif " promote " in command:
            assert "v3" in out
        elif command.endswith(" rollback"):
            assert "rolled back" in out
        elif " predict " in command:
            assert any(c in out for c in classes), out


def _start(repo: Path, env: dict, line: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", line], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_make_ui_serves_the_links_it_prints(clone, way):
    repo, env, _ = clone
    (command,) = _commands("ui")
    port = free_port()
    proc = _start(repo, env, typed(f"{command} PORT={port}", way))
    try:
        links = printed_links(proc, START_WAIT)
        base = f"http://127.0.0.1:{port}"
        exp_id = _client(repo).get_experiment_by_name("food101").experiment_id
        assert links["runs"] == (f"{base}/#/experiments/{exp_id}/runs?workflowType="
                                 "machine_learning&viewStateShareKey=model-training")
        assert links["model"] == f"{base}/#/models/food101-resnet50?workflowType=machine_learning"
        with urllib.request.urlopen(base + "/", timeout=30) as resp:  # the UI's page
            assert resp.status == 200 and b"<div id=\"root\"" in resp.read()
        api = f"{base}/ajax-api/2.0/mlflow"
        exp = _get_json(f"{api}/experiments/get?experiment_id={exp_id}")["experiment"]
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        assert "**Champion:**" in tags["mlflow.note.content"]
        assert "mlflow.sharedViewState.model-training" in tags
        model = _get_json(f"{api}/registered-models/get?name=food101-resnet50")
        assert "champion" in {a["alias"] for a in model["registered_model"]["aliases"]}
    finally:
        stop_group(proc, signal.SIGINT)  # Ctrl-C
    assert proc.returncode is not None
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # Ctrl-C stopped the server
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_serving_the_champion(clone, way):
    repo, env, _ = clone
    serve, curl = _commands("serve")
    port = str(free_port())
    proc = _start(repo, env, typed(serve.replace("5001", port), way))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, START_WAIT, "mlflow models serve")
        answer = json.loads(_sh(repo, env, typed(curl.replace("5001", port), way)))
        (pred,) = answer["predictions"]
        assert pred["label"] in {d.name for d in (repo / "data/source/images").iterdir()}
        assert 0.0 <= pred["confidence"] <= 1.0
    finally:
        stop_group(proc, signal.SIGINT)  # Ctrl-C


@pytest.mark.slow
def test_loading_the_model_anywhere(clone):
    repo, env, _ = clone
    (snippet,) = _commands("load")
    code = snippet.replace("/path/to/repo", str(repo))
    code += "\nout = model.predict(frame)\nprint(out.to_json(orient='records'))\n"
    with_output = _sh(repo, env, f".venv/bin/python - <<'EOF'\n{code}\nEOF")
    rows = json.loads(with_output.strip().splitlines()[-1])
    assert rows and set(rows[0]) == {"label", "confidence", "top5", "error"}
    assert rows[0]["error"] is None
