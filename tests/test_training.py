import numpy as np
from conftest import tiny_params

from pipeline.sampling import draw_sample, split_sample
from pipeline.sources import index_food101
from pipeline.training import train_model


def test_head_on_frozen_random_backbone_learns_the_demo(learnable_demo, tmp_path):
    """Well above chance (1/6) on held-out validation images of the generated demo set."""
    params = tiny_params(
        data={"image_size": 64},
        sample={"size": 360, "test_size": 60, "unlabeled_size": 0},
        train={"epochs": 15, "batch_size": 32, "log_every": 1000},
    )
    root, index, classes = index_food101(learnable_demo)
    res = draw_sample(root, index, classes, params.sample, 64, tmp_path / "u")
    train, val = split_sample(res.sample, params.split)
    epochs = []
    result = train_model(root, train, val, classes, params.model, params.train, 64,
                         tmp_path / "cache", on_epoch=lambda e, m: epochs.append(e))
    assert epochs == list(range(1, 16))
    assert result.path == "cached-features"
    acc = result.final["val_accuracy"]
    assert acc >= 0.4, f"val_accuracy {acc:.3f} vs chance {1 / 6:.3f}"
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]


def test_end_to_end_path_with_augmentation(tiny_data, tmp_path):
    p = tiny_params(train={"augment": True, "epochs": 1}, model={"freeze": "layer4"})
    steps = []
    result = train_model(tiny_data.root, tiny_data.train, tiny_data.val, tiny_data.classes,
                         p.model, p.train, 32, None, on_step=lambda s, loss: steps.append(loss))
    assert result.path == "end-to-end"
    assert len(steps) == int(np.ceil(len(tiny_data.train) / p.train.batch_size))
    assert np.isfinite(result.final["val_loss"])
