"""The MLflow UI as a person sees it, in headless Chromium.

A project folder holds a store with two runs trained and evaluated by the real jobs (so a
registered model with a champion, descriptions and pictures); `python -m pipeline ui` (what
`make ui` runs) serves it and prints its links. They open the runs table in model-training
mode with the run names and `test_accuracy` on screen; the compare page shows both runs; the
registered model's page shows the champion. Screenshots are kept as test artifacts under
``test-artifacts/browser/`` (git-ignored).

Needs Debian's Chromium (`apt-get install chromium chromium-driver`, which `.ci/run` does)
and Playwright for Python (the `dev` extra); Playwright drives the system browser, it
downloads none.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import mlflow
import pytest
from helpers import (
    REPO,
    free_port,
    fresh_store,
    make_tiny_data,
    printed_links,
    stop_group,
    use_store,
)

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "browser"
# As root Chromium needs --no-sandbox; the rest keeps it off this machine's closed network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
WAIT_MS = 60_000
UI_WAIT = 180
NAMES = ("lr=0.003", "lr=0.03")

# The mode switch in the sidebar marks the selected mode only by style: a sliding indicator
# under it and darker text.
MODE_JS = """() => {
  const button = t => [...document.querySelectorAll('[role=button]')]
      .find(x => x.innerText.trim() === t);
  const ml = button('Model training'), genai = button('GenAI');
  const box = e => e.getBoundingClientRect();
  const indicator = box(ml.parentElement.firstElementChild.firstElementChild);
  const middle = (indicator.left + indicator.right) / 2;
  const dark = e => getComputedStyle(e.firstElementChild).color
      .match(/\\d+/g).slice(0, 3).reduce((a, b) => a + Number(b), 0);
  return {indicatorOnModelTraining: box(ml).left < middle && middle < box(ml).right,
          darkerThanGenAI: dark(ml) < dark(genai)};
}"""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("headless Chromium is not installed: `apt-get install chromium "
                    "chromium-driver` as root (.ci/run installs them when missing)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[dev]'")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {ARTIFACTS}")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)  # fresh profile
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def project(tiny_demo, tmp_path_factory, migrated_db):
    """A project folder whose mlruns/ holds two evaluated runs of the real jobs."""
    from pipeline.jobs.evaluate import TestData, evaluate_and_log
    from pipeline.jobs.train import TrainData, TrainRun, train_and_log
    from pipeline.runs.spec import run_spec

    root = tmp_path_factory.mktemp("ui-project")
    uri = fresh_store(root, migrated_db)
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, uri)
        for name in NAMES:
            data = make_tiny_data(tiny_demo, root / name, train={"lr": float(name[3:])})
            p = data.params
            spec = dataclasses.replace(run_spec(p), name=name)
            trained = train_and_log(TrainRun.from_params(
                p, TrainData(data.root, data.classes, data.train, data.val), root / "cache",
                spec=spec))
            evaluate_and_log(TestData(data.root, data.classes, data.test), trained.run,
                             p.registry, p.compute, root / "cache")
            runs.append(trained.run.run_id)
        while mlflow.active_run():
            mlflow.end_run()
    client = mlflow.MlflowClient(uri, uri)
    exp_id = client.get_experiment_by_name("food101").experiment_id
    return root, exp_id, runs


@pytest.fixture(scope="module")
def ui(project):
    """`python -m pipeline ui` in the project folder; the links it printed."""
    root, _, _ = project
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port),
                             "--no-browser"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", printed_links(proc, UI_WAIT)
    finally:
        stop_group(proc, signal.SIGINT)  # Ctrl-C


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    yield context.new_page()
    context.close()


def _shot(page, name: str, full: bool = False) -> None:
    page.screenshot(path=str(ARTIFACTS / name), full_page=full)


def test_the_runs_link_opens_the_runs_table_in_model_training_mode(ui, project, page):
    _, links = ui
    _, exp_id, _ = project
    assert f"/#/experiments/{exp_id}/runs?workflowType=machine_learning" in links["runs"]
    page.goto(links["runs"])
    for name in NAMES:
        page.get_by_text(name, exact=True).first.wait_for(timeout=WAIT_MS)
    header = page.get_by_role("columnheader", name="test_accuracy").first
    header.wait_for(timeout=WAIT_MS)
    page.wait_for_timeout(1500)  # the mode switch slides into place
    _shot(page, "runs.png")
    box = header.bounding_box()
    assert box and box["x"] + box["width"] <= VIEWPORT["width"]  # on screen, no scrolling
    assert page.evaluate(MODE_JS) == {"indicatorOnModelTraining": True, "darkerThanGenAI": True}
    # the sidebar of model training, not GenAI's traces/judges/prompts
    assert page.get_by_text("Model registry", exact=True).first.is_visible()
    assert page.get_by_text("Judges", exact=True).count() == 0
    assert "Compare runs:" in page.inner_text("body")  # the experiment's description


def test_the_compare_page_shows_both_runs(ui, project, page):
    from pipeline.runs import notes

    base, _ = ui
    _, exp_id, runs = project
    compare = notes.ui_route(f"compare-runs?runs={quote(json.dumps(runs))}"
                             f"&experiments={quote(json.dumps([exp_id]))}")
    page.goto(f"{base}/{compare}")
    page.get_by_text("Comparing 2 Runs", exact=False).first.wait_for(timeout=WAIT_MS)
    page.get_by_text("test_accuracy", exact=True).first.wait_for(timeout=WAIT_MS)
    _shot(page, "compare.png", full=True)
    text = page.inner_text("body")
    for name in NAMES:
        assert name in text
    assert "test_top5_accuracy" in text and "test_macro_f1" in text


def test_the_model_link_shows_the_champion(ui, page):
    _, links = ui
    page.goto(links["model"])
    page.get_by_text("champion", exact=False).first.wait_for(timeout=WAIT_MS)
    page.get_by_text("Version 2", exact=True).first.wait_for(timeout=WAIT_MS)
    _shot(page, "model.png")
    text = page.inner_text("body")
    assert re.search(r"@\s*champion", text), text[:2000]
    assert "models:/food101-resnet50@champion" in text  # the registered model's description
    assert "test_accuracy 0." in text  # the versions' descriptions


def test_a_run_shows_its_description_and_pictures(ui, project, page):
    from pipeline.runs import notes

    base, _ = ui
    _, exp_id, runs = project
    page.goto(f"{base}/{notes.run_route(exp_id, runs[1])}")
    page.get_by_text("Description", exact=True).first.wait_for(timeout=WAIT_MS)
    page.get_by_text("What differs from the committed baseline", exact=False).first.wait_for(
        timeout=WAIT_MS)
    _shot(page, "run.png", full=True)
    route = notes.ui_route(
        f"experiments/{exp_id}/runs/{runs[1]}/artifacts/evaluation/per_class_accuracy.png")
    page.goto(f"{base}/{route}")
    page.get_by_text("evaluation/per_class_accuracy.png", exact=True).first.wait_for(
        timeout=WAIT_MS)
    image = page.locator("img[src^='blob:']").first  # the UI fetches the file into a blob
    image.wait_for(timeout=WAIT_MS)
    page.wait_for_function("img => img.complete && img.naturalWidth > 500",
                           arg=image.element_handle(), timeout=WAIT_MS)
    _shot(page, "run-per-class-accuracy.png")
