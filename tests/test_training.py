"""The training loop (``train_one_epoch``, ``evaluate``, ``fit``) on small tensors, and
``train_model`` on both of its paths."""

import numpy as np
import pytest
import torch
from helpers import tiny_params
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.data.sampling import draw_sample, split_sample
from pipeline.data.sources import index_food101
from pipeline.handoffs import Manifest
from pipeline.loop import Steps, Update, evaluate, fit, train_one_epoch
from pipeline.training import TrainData, TrainJob, _lone_last_batch, seed_everything, train_model


def _separable(n=64, dim=8, classes=3, seed=0):
    """Features whose class is the argmax of their first ``classes`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x[:, :classes].argmax(1)
    return x, y


def _head(dim=8, classes=3):
    return nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, classes),
                         nn.LogSoftmax(dim=1))


def _job(params, td) -> TrainJob:
    return TrainJob.from_params(params, TrainData(td.root, td.classes, td.train, td.val), None)


def test_evaluate_scores_against_the_true_labels():
    torch.manual_seed(0)  # torch's default seed differs per process: the shuffle below
    x, y = _separable()   # could, by chance, keep the accuracy
    model = _head()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    m = evaluate(model, loader, "fp32")
    with torch.no_grad():
        out = model(x)
    assert m["val_accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert m["val_loss"] == pytest.approx(nn.functional.nll_loss(out, y).item(), rel=1e-5)
    shuffled = DataLoader(TensorDataset(x, y[torch.randperm(len(y))]), batch_size=10)
    assert evaluate(model, shuffled, "fp32")["val_accuracy"] != m["val_accuracy"]
    assert not model.training


def test_train_one_epoch_steps_logs_and_returns_the_mean_loss():
    x, y = _separable(n=50)
    model = _head()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 16, 16, 16, 2
    seen = []
    m, step = train_one_epoch(model, loader, Update(opt), log_every=2, step=10,
                              on_step=lambda s, loss: seen.append(s))
    assert step == 14  # four batches after step 10
    assert seen == [12, 14]
    assert np.isfinite(m["train_loss"]) and m["train_loss"] > 0
    assert model.training


def test_fit_learns_and_reports_every_epoch():
    x, y = _separable(n=120)
    seed_everything(0)
    model = _head()
    epochs = []
    cfg = tiny_params(train={"epochs": 6, "lr": 0.02, "log_every": 1000}).train
    history = fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
                  DataLoader(TensorDataset(x, y), batch_size=64), cfg,
                  on_epoch=lambda e, m: epochs.append(e))
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert [h["epoch"] for h in history] == epochs
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] >= 0.8  # linearly separable: well above chance 1/3


def test_a_lone_last_batch_is_dropped_only_when_it_would_break_batchnorm():
    assert _lone_last_batch(33, 16) is True  # 16 + 16 + 1
    assert _lone_last_batch(34, 16) is False
    assert _lone_last_batch(1, 16) is False  # a single batch: keep it
    # a head with BatchNorm1d in train mode fails on a batch of one: that is what it avoids
    bn = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2), nn.LogSoftmax(dim=1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn.train()(torch.randn(1, 4))


def test_train_model_with_a_lone_last_image(tiny_data):
    """48 sampled, 36 train images, batch 35: the last batch has one image and is dropped."""
    p = tiny_params(train={"batch_size": 35, "epochs": 1})
    steps = []
    result = train_model(_job(p, tiny_data), on_step=lambda s, loss: steps.append(s))
    assert len(tiny_data.train.frame) == 36
    assert steps == [1]
    assert np.isfinite(result.final["train_loss"])


def test_end_to_end_path_with_augmentation(tiny_data):
    p = tiny_params(train={"augment": True, "epochs": 1}, model={"freeze": "layer4"})
    steps = []
    result = train_model(_job(p, tiny_data), on_step=lambda s, loss: steps.append(loss))
    assert result.path == "end-to-end"
    assert len(steps) == int(np.ceil(len(tiny_data.train.frame) / p.train.batch_size))
    assert np.isfinite(result.final["val_loss"])


@pytest.mark.slow
def test_head_on_frozen_random_backbone_learns_the_demo(learnable_demo):
    """Well above chance (1/6) on held-out validation images of the generated demo set."""
    params = tiny_params(
        data={"image_size": 64},
        sample={"size": 360, "test_size": 60, "unlabeled_size": 0},
        train={"epochs": 15, "batch_size": 32, "log_every": 1000},
    )
    root, index, classes = index_food101(learnable_demo)
    res = draw_sample(root, index, classes, params.sample, 64)
    train, val = split_sample(res.sample.frame, params.split)
    epochs = []
    data = TrainData(root, tuple(classes), Manifest(train), Manifest(val))
    result = train_model(TrainJob.from_params(params, data, None),
                         on_epoch=lambda e, m: epochs.append(e))
    assert epochs == list(range(1, 16))
    assert result.path == "cached-features"
    acc = result.final["val_accuracy"]
    assert acc >= 0.4, f"val_accuracy {acc:.3f} vs chance {1 / 6:.3f}"
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]


# -- the fine-tuning options ----------------------------------------------------------------


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real module is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_fine_tuning_keeps_frozen_batchnorm_in_eval_mode_under_a_wrapper(backbone):
    from pipeline.model.network import HeadSpec, apply_freeze, build_model

    torch.manual_seed(0)
    net = build_model("resnet50", 3, HeadSpec(hidden=8), backbone)
    apply_freeze(net, "layer4")
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])),
                        batch_size=4)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.01)
    before = net.backbone.layer3[0].bn1.running_mean.clone()
    train_one_epoch(_Wrapper(net), loader, Update(opt), Steps(freeze="layer4"), log_every=10,
                    step=0)
    assert net.backbone.layer4.training and net.head.training  # unfrozen: batch statistics
    assert not net.backbone.layer3.training and not net.backbone.bn1.training  # frozen: eval
    assert torch.equal(net.backbone.layer3[0].bn1.running_mean, before)


def test_cosine_schedule_weight_decay_and_keeping_the_best_epoch():
    from pipeline.loop import kept_epoch, make_optimizer

    cfg = tiny_params(train={"epochs": 4, "lr": 0.05, "log_every": 1000,
                             "scheduler": "cosine", "weight_decay": 0.01, "keep": "best"}).train
    assert isinstance(make_optimizer([nn.Parameter(torch.zeros(1))], cfg), torch.optim.AdamW)
    x, y = _separable(n=96)
    seed_everything(0)
    model = _head()
    snapshots = []
    history = fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
                  DataLoader(TensorDataset(x[:40], y[:40]), batch_size=64), cfg,
                  on_epoch=lambda e, m: snapshots.append(
                      {k: v.clone() for k, v in model.state_dict().items()}))
    lrs = [h["lr"] for h in history]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0, abs=1e-9)
    best = kept_epoch(history, "best")
    assert history[best - 1]["val_accuracy"] == max(h["val_accuracy"] for h in history)
    for k, v in model.state_dict().items():  # the model ends with the best epoch's weights
        assert torch.equal(v, snapshots[best - 1][k]), k
    assert kept_epoch(history, "last") == 4
