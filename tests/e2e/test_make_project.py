"""The temporary project every end-to-end test runs in starts from the committed params.yaml
(plus the test's own overrides), not from what the last `dvc exp run` left in the workspace.

Fast: it copies files and makes two git commits; no stage runs.
"""

import yaml
from helpers import TINY_PROJECT, make_project


def test_a_copy_takes_the_committed_params_not_the_workspace_ones(tmp_path):
    source = tmp_path / "source"
    make_project(source)  # a project with its params.yaml committed
    committed = yaml.safe_load((source / "params.yaml").read_text())
    # What `dvc exp run -S predict.batch_size=8` and `-S compute.nproc=2` leave in the workspace
    applied = yaml.safe_load((source / "params.yaml").read_text())
    applied["predict"]["batch_size"] = 8
    applied["compute"]["nproc"] = 2
    (source / "params.yaml").write_text(yaml.safe_dump(applied, sort_keys=False))

    copy = tmp_path / "copy"
    make_project(copy, {"train": {"epochs": 3}}, source=source)
    values = yaml.safe_load((copy / "params.yaml").read_text())
    assert values["predict"]["batch_size"] == committed["predict"]["batch_size"] != 8
    assert values["compute"]["nproc"] == committed["compute"]["nproc"] != 2
    assert values["train"]["epochs"] == 3  # the test's own override
    assert values["data"]["image_size"] == TINY_PROJECT["data"]["image_size"]


def test_the_tiny_project_params_are_valid():
    """The overrides every end-to-end test starts from pass the config's checks (an old
    spelling such as train.num_workers would stop every stage)."""
    from helpers import committed_text

    from pipeline.config import params_from_dict

    values = yaml.safe_load(committed_text("params.yaml"))
    for section, overrides in TINY_PROJECT.items():
        values[section].update(overrides)
    assert params_from_dict(values).compute.num_workers == 0
