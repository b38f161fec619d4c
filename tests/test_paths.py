"""Where the project lives, also inside DVC's temporary experiment workspaces."""

from pathlib import Path

from pipeline.paths import project_root, resolve_user_path


def test_project_root_inside_dvc_experiment_workspaces(tmp_path):
    repo = tmp_path / "repo"
    temp_ws = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd" / "sub"
    temp_ws.mkdir(parents=True)
    assert project_root(temp_ws) == repo.resolve()
    assert project_root(repo) == repo.resolve()
    assert resolve_user_path("../data", temp_ws) == (tmp_path / "data").resolve()
    assert resolve_user_path("/abs/x", temp_ws) == Path("/abs/x")
