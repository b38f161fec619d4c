"""The one typed config: every wrong key, type or value is named with what is allowed."""

import pytest

from pipeline.config import ConfigError, load_params, params_from_dict


def test_committed_params_load():
    p = load_params("params.yaml")
    assert p.sample.size == 10_000 and p.sample.test_size == 1_000
    assert p.model.weights == "none" and p.data.source == "demo"


@pytest.mark.parametrize(
    ("raw", "key", "hint"),
    [
        ({"train": {"lrate": 0.1}}, "train.lrate", "allowed keys"),
        ({"trian": {}}, "trian", "allowed sections"),
        ({"train": {"lr": "fast"}}, "train.lr", "a number"),
        ({"train": {"epochs": 1.5}}, "train.epochs", "an integer"),
        ({"train": {"epochs": 0}}, "train.epochs", ">= 1"),
        ({"train": {"lr": -0.1}}, "train.lr", "> 0"),
        ({"sample": {"size": -5}}, "sample.size", "positive"),
        ({"sample": {"size": "most"}}, "sample.size", "one of 'all'"),
        ({"sample": {"test_size": 0}}, "sample.test_size", "'all' or a positive count"),
        ({"sample": {"classes": "some"}}, "sample.classes", "'all'"),
        ({"split": {"val_fraction": 1.2}}, "split.val_fraction", "(0, 1)"),
        ({"split": {"val_fraction": 0}}, "split.val_fraction", "(0, 1)"),
        ({"data": {"source": "kaggle"}}, "data.source", "'demo', 'food101', 'imagefolder'"),
        ({"data": {"source": "food101"}}, "data.root", "required"),
        ({"model": {"freeze": "all"}}, "model.freeze", "'backbone', 'layer4', 'none'"),
        ({"train": {"precision": "fp8"}}, "train.precision", "'auto', 'fp32', 'bf16', 'fp16'"),
        ({"compute": {"device": "gpu"}}, "compute.device", "cuda:N"),
        ({"compute": {"device": "cuda:x"}}, "compute.device", "cuda:N"),
        ({"compute": {"nproc": 0}}, "compute.nproc", ">= 1"),
        ({"compute": {"nproc": "all"}}, "compute.nproc", "'auto' or an integer"),
        ({"compute": {"nproc": 2, "device": "cuda:1"}}, "compute.nproc", "compute.device=cuda"),
        ({"compute": {"nproc": 2, "device": "mps"}}, "compute.nproc", "must be 1"),
        ({"compute": {"nproc": 4}, "train": {"batch_size": 2}}, "train.batch_size",
         "one image per"),
        ({"train": {"device": "cpu"}}, "train.device", "moved to compute.device"),
        ({"train": {"nproc": 2}}, "train.nproc", "moved to compute.nproc"),
        ({"compute": {"num_workers": -1}}, "compute.num_workers", ">= 0"),
        ({"compute": {"num_workers": "many"}}, "compute.num_workers", "'auto' or an integer"),
        ({"train": {"scheduler": "step"}}, "train.scheduler", "'none', 'cosine'"),
        ({"train": {"weight_decay": -0.1}}, "train.weight_decay", ">= 0"),
        ({"train": {"keep": "first"}}, "train.keep", "'last', 'best'"),
        ({"train": {"augment": "yes"}}, "train.augment", "true/false"),
        ({"registry": {"min_delta": -1}}, "registry.min_delta", ">= 0"),
    ],
)
def test_bad_values_name_the_key(raw, key, hint):
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert hint in msg, msg


def test_valid_overrides_and_class_specs():
    p = params_from_dict({"sample": {"classes": ["a", "b"]}, "train": {"lr": 1}})
    assert p.sample.classes == ("a", "b")
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)
    assert params_from_dict({"sample": {"classes": 5}}).sample.classes == 5
    p = params_from_dict({"compute": {"nproc": "auto", "num_workers": 3, "device": "cuda:1"},
                          "train": {"weight_decay": 0}})
    c = p.compute
    assert (c.nproc, c.num_workers, c.device, p.train.weight_decay) == ("auto", 3, "cuda:1", 0.0)
    assert params_from_dict({"compute": {"nproc": 2, "device": "cpu"}}).compute.nproc == 2


def test_digest_changes_with_values():
    a = params_from_dict({})
    b = params_from_dict({"train": {"lr": 0.001}})
    assert a.digest() == params_from_dict({}).digest()
    assert a.digest() != b.digest()
    assert b.flat()["train.lr"] == 0.001


def test_config_does_not_import_the_data_or_model_code():
    import ast
    from pathlib import Path

    import pipeline.config

    tree = ast.parse(Path(pipeline.config.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("pipeline")} == {"pipeline.errors",
                                                                       "pipeline.hashing"}
