"""``python -m pipeline ...``: registry commands and one-off predictions, run in-process."""

from __future__ import annotations

import json

import pytest
from helpers import log_echo_model
from PIL import Image

from pipeline.cli import main
from pipeline.config import Params
from pipeline.runs import registry, run_model

NAME = "cli-test-model"


@pytest.fixture(autouse=True)
def store(mlflow_store) -> str:
    """conftest's fresh ``mlflow_store`` for every test (autouse: before ``trained_run``)."""
    return mlflow_store


@pytest.fixture()
def versions(store):
    """Register ``n`` versions of a trivial logged model under NAME; returns a function."""
    uri = log_echo_model("cli-tests")

    def make(*accuracies: float) -> list[str]:
        return [registry.register(uri, NAME, {"test_accuracy": f"{a:.6f}",
                                              "test_manifest_sha256": "m" * 64})
                for a in accuracies]

    return make


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = main(["--name", NAME, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def gate(version: str, accuracy: float) -> dict:
    return registry.gate(NAME, version, accuracy, "m" * 64, 0.0, lambda uri: 0.0).as_dict()


# -- errors: exit 2, one clear line on stderr, nothing on stdout ---------------------------------

def test_versions_on_empty_registry(capsys, store):
    code, out, err = cli(capsys, "versions")
    assert code == 2
    assert out == ""
    assert err.startswith(f"error: registered model '{NAME}' does not exist")
    assert "registry is empty" in err
    assert "dvc repro" in err  # says how to get a first version
    assert "Traceback" not in err


def test_promote_unknown_version_names_known_versions(capsys, versions):
    code, out, err = cli(capsys, "promote", "99")  # nothing registered yet
    assert code == 2 and "registry is empty" in err

    versions(0.5, 0.6)
    code, out, err = cli(capsys, "promote", "99")
    assert code == 2
    assert out == ""
    assert err.startswith("error:")
    assert "no version 99" in err
    assert "versions: [1, 2]" in err
    assert registry.alias_version(NAME, "champion") is None  # nothing changed


def test_rollback_with_nothing_to_roll_back(capsys, versions):
    code, _, err = cli(capsys, "rollback")
    assert code == 2 and "registry is empty" in err

    (v1,) = versions(0.5)
    gate(v1, 0.5)
    code, out, err = cli(capsys, "rollback")
    assert code == 2
    assert out == ""
    assert "nothing to roll back" in err
    assert "previous-champion" in err
    assert str(registry.alias_version(NAME, "champion").version) == v1


def test_predict_missing_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40), "red").save(tmp_path / "there.jpg")
    code, out, err = cli(capsys, "predict", "missing.jpg")
    assert code == 2
    assert out == ""
    assert err.strip() == "error: no such file(s): missing.jpg"

    code, _, err = cli(capsys, "predict", "there.jpg", "gone.png", "missing.jpg")
    assert code == 2
    assert "gone.png, missing.jpg" in err
    assert "there.jpg" not in err


def test_predict_without_champion(capsys, tmp_path, versions):
    image = tmp_path / "dish.jpg"
    Image.new("RGB", (40, 40), "blue").save(image)
    versions(0.5)  # registered, never promoted
    code, out, err = cli(capsys, "predict", str(image))
    assert code == 2
    assert out == ""
    assert "no version with alias 'champion'" in err
    assert "promote" in err
    code, _, err = cli(capsys, "predict", str(image), "--model", "3")
    assert code == 2
    assert "no version 3; versions: [1]" in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["promote", "latest"])  # the version must be a number
    assert exc.value.code == 2
    assert "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_name_defaults_to_params_yaml(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["versions"]) == 2
    assert f"'{Params().registry.model_name}' does not exist" in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text("registry:\n  model_name: my-dishes\n")
    assert main(["versions"]) == 2
    assert "'my-dishes' does not exist" in capsys.readouterr().err


def test_a_broken_params_yaml_is_reported_not_guessed(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("registry:\n  model_nam: typo\n")
    assert main(["versions"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: registry.model_nam") and "Traceback" not in err


# -- success paths -----------------------------------------------------------------------------

def test_promote_and_rollback(capsys, versions):
    v1, v2 = versions(0.5, 0.4)
    gate(v1, 0.5)
    assert gate(v2, 0.4)["promoted"] is False

    code, out, err = cli(capsys, "promote", "2")
    assert (code, err) == (0, "")
    assert out.strip() == f"{NAME}: champion is now v2 (previous-champion: v1)"
    assert str(registry.alias_version(NAME, "champion").version) == "2"

    code, out, err = cli(capsys, "rollback")
    assert (code, err) == (0, "")
    assert out.strip() == f"{NAME}: rolled back, champion is now v1 (previous-champion: v2)"
    assert str(registry.alias_version(NAME, "champion").version) == "1"
    assert str(registry.alias_version(NAME, "previous-champion").version) == "2"


def _table(out: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return lines[0].split(), [line.split() for line in lines[1:]]


def test_versions_lists_newest_first(capsys, versions):
    v1, v2 = versions(0.5, 0.75)
    gate(v1, 0.5)
    gate(v2, 0.75)
    code, out, err = cli(capsys, "versions")
    assert (code, err) == (0, "")
    header, rows = _table(out)
    assert header == ["version", "aliases", "test_accuracy", "test_macro_f1", "promotion",
                      "created", "run_id"]
    assert [r[0] for r in rows] == ["2", "1"]
    assert "0.750000" in rows[0] and "0.500000" in rows[1]
    assert "promoted" in rows[0] and "promoted" in rows[1]


def test_versions_shows_champion(capsys, versions):
    v1, v2 = versions(0.5, 0.75)
    gate(v1, 0.5)
    gate(v2, 0.75)
    code, out, _ = cli(capsys, "versions")
    assert code == 0
    _, rows = _table(out)
    assert rows[0][:2] == ["2", "challenger,champion"]
    assert rows[1][:2] == ["1", "previous-champion"]


def test_predict_skips_unreadable_files_and_labels_the_rest(capsys, champion_store, tmp_path,
                                                          monkeypatch):
    """The command's own part (which files, what it prints); the model runs as in
    ``run_model.predict_files`` (tested with the real subprocess in the predict job's tests
    and in the slow lane here)."""
    import pandas as pd

    c = champion_store
    images = [str(c.data.root / p) for p in c.data.test.frame["path"].head(2)]
    calls = []

    def fake_predict(uri, paths, batch_size=16):
        calls.append((uri, [str(p) for p in paths]))
        n = len(paths)
        if n == 1:  # only the broken file
            return pd.DataFrame({"label": [None], "confidence": [None], "top5": [None],
                                 "error": ["broken.jpg: not a readable image"]})
        return pd.DataFrame({"label": [None, "x", "y"], "confidence": [None, 0.5, 0.25],
                             "top5": [None, '[["x", 0.5]]', '[["y", 0.25]]'],
                             "error": ["broken.jpg: not a readable image", None, None]})

    monkeypatch.setattr(run_model, "predict_files", fake_predict)
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a photo")
    capsys.readouterr()
    assert main(["--name", c.name, "predict", "--json", str(bad), *images]) == 0
    captured = capsys.readouterr()
    assert calls == [(f"models:/{c.name}/1", [str(bad), *images])]  # pinned to the version
    records = json.loads(captured.out)
    assert [(r["file"], r["label"], r["confidence"]) for r in records] == [
        (str(bad), None, None), (images[0], "x", 0.5), (images[1], "y", 0.25)]
    assert "not a readable image" in records[0]["error"] and records[1]["error"] is None
    assert main(["--name", c.name, "predict", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "none of the files is a readable image" in captured.err
    assert "broken.jpg" in captured.out  # its row, with the error, is still shown


@pytest.mark.slow
def test_predict_table_with_a_version(capsys, champion_store):
    c = champion_store
    images = [str(c.data.root / p) for p in c.data.test.frame["path"].head(2)]
    capsys.readouterr()
    assert main(["--name", c.name, "predict", "--model", "1", *images]) == 0  # a real run
    captured = capsys.readouterr()
    assert "error" not in captured.err.lower()
    header, rows = _table(captured.out)
    assert header == ["file", "label", "confidence", "top5"]
    assert [r[0] for r in rows] == images
    assert [r[1] for r in rows] == c.evaluated.confusion["predicted"].head(2).tolist()
    for r in rows:
        assert 0.0 <= float(r[2]) <= 1.0
        top5 = " ".join(r[3:])  # "label 0.40, label 0.30, ..."
        assert len(top5.split(", ")) == min(5, len(c.data.classes))
        assert top5.startswith(r[1] + " ")


def test_versions_of_a_trained_champion(capsys, champion_store):
    c = champion_store
    capsys.readouterr()
    assert main(["--name", c.name, "versions"]) == 0
    vrows = _table(capsys.readouterr().out)[1]
    assert [r[0] for r in vrows] == ["1"]
    assert f"{c.evaluated.metrics['test_accuracy']:.6f}" in vrows[0]
    assert "promoted" in vrows[0]
    assert c.trained.run.run_id in vrows[0]


# -- the MLflow UI's links ----------------------------------------------------------------------

def test_ui_links_open_the_runs_table_and_the_model_in_model_training_mode(capsys, store):
    from pipeline.runs import tracking

    code, out, _ = cli(capsys, "ui-links", "--port", "5099", "--experiment", "ui-exp")
    assert code == 0
    assert "no experiment 'ui-exp' in the store yet" in out
    assert "runs:  http://127.0.0.1:5099/#/experiments?workflowType=machine_learning" in out
    exp_id = tracking.ensure_experiment("ui-exp")
    tracking.describe_experiment(exp_id, NAME)
    code, out, _ = cli(capsys, "ui-links", "--port", "5099", "--experiment", "ui-exp")
    assert out.splitlines() == [
        f"runs:  http://127.0.0.1:5099/#/experiments/{exp_id}/runs?"
        "workflowType=machine_learning&viewStateShareKey=model-training",
        f"model: http://127.0.0.1:5099/#/models/{NAME}?workflowType=machine_learning",
    ]


def test_ui_against_a_team_server_starts_nothing(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("pipeline.runs.tracking.runs_page", lambda name: None)
    code, out, _ = cli(capsys, "ui")
    assert code == 0
    assert out.startswith("MLFLOW_TRACKING_URI is http://127.0.0.1:9: open that server's UI")
    assert f"model: http://127.0.0.1:9/#/models/{NAME}?workflowType=machine_learning" in out


def test_ui_on_a_busy_port_says_how_to_move_it(capsys, store, monkeypatch, tmp_path):
    import socket

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # the project's own store: mlruns/ here
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = cli(capsys, "ui", "--port", str(port), "--no-browser")
    assert code == 2 and out == ""
    assert f"something already listens on 127.0.0.1:{port}" in err and "PORT=" in err


def test_a_browser_opens_only_where_a_desktop_exists(monkeypatch):
    from pipeline.cli import _desktop

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not _desktop()  # a server, CI, ssh: print the links only
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert _desktop()


@pytest.mark.slow
def test_the_cli_labels_the_readable_files_and_reports_the_others(champion_store, tmp_path,
                                                                  capsys):
    from helpers import bomb_png

    c = champion_store
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    good = str(c.data.root / c.data.test.frame["path"].iloc[0])
    capsys.readouterr()
    assert main(["--name", c.name, "predict", "--json", str(tmp_path / "bomb.png"), good]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["label"] is None and "decompression bomb" in rows[0]["error"]
    assert rows[1]["label"] == c.evaluated.confusion["predicted"].iloc[0]


def test_predict_a_folder_labels_the_images_in_it(capsys, champion_store, tmp_path,
                                                  monkeypatch):
    """A folder stands for the image files under it (sorted, subfolders too, other files
    skipped); an explicitly named file is passed as given; a folder without images stops."""
    import pandas as pd

    c = champion_store
    folder = tmp_path / "photos"
    (folder / "b_class").mkdir(parents=True)
    (folder / "a_class").mkdir()
    src = [c.data.root / p for p in c.data.test.frame["path"].head(3)]
    wanted = [folder / "a_class" / "2.JPG", folder / "b_class" / "1.jpg", folder / "top.png"]
    for s, w in zip(src, wanted, strict=True):
        w.write_bytes(s.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    named = tmp_path / "one.jpg"
    named.write_bytes(src[0].read_bytes())
    calls = []

    def fake_predict(uri, paths, batch_size=16):
        calls.append([str(p) for p in paths])
        return pd.DataFrame({"label": ["x"] * len(paths), "confidence": [0.5] * len(paths),
                             "top5": ['[["x", 0.5]]'] * len(paths)})

    monkeypatch.setattr(run_model, "predict_files", fake_predict)
    capsys.readouterr()
    assert main(["--name", c.name, "predict", "--json", str(named), str(folder)]) == 0
    assert calls == [[str(named), *map(str, wanted)]]
    records = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in records] == calls[0]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("no photos here")
    assert main(["--name", c.name, "predict", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "empty holds no image files (jpg, jpeg, png, webp)" in err and len(calls) == 1
