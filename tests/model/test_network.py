"""The network and freezing: a frozen backbone never moves, BatchNorm statistics included."""

import pytest
import torch

from pipeline.model.network import (
    FoodNet,
    HeadSpec,
    apply_freeze,
    build_model,
    frozen_modules,
    set_train_mode,
    state_digest,
)


def _bn_stats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def _model(backbone, freeze: str) -> FoodNet:
    model = build_model("resnet50", 3, HeadSpec(hidden=16), backbone)
    apply_freeze(model, freeze)
    return model


@pytest.mark.parametrize("freeze", ["backbone", "layer4"])
def test_frozen_backbone_batchnorm_statistics_do_not_move(freeze, backbone):
    model = _model(backbone, freeze)
    frozen = torch.nn.ModuleList(frozen_modules(model, freeze))
    before = _bn_stats(frozen)
    frozen_params = {n: p.clone() for n, p in frozen.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        set_train_mode(model, freeze)
        loss = torch.nn.functional.nll_loss(model(torch.randn(4, 3, 32, 32)),
                                            torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in _bn_stats(frozen).items():
        assert torch.equal(v, before[k]), k
    for n, p in frozen.named_parameters():
        assert torch.equal(p, frozen_params[n]), n
    assert all(not m.training for c in frozen.children() for m in c.modules())
    assert model.head.training  # the head does train
    if freeze == "layer4":  # the unfrozen block does learn (and its BN does update)
        assert model.backbone.layer4.training
        l4 = model.backbone.layer4[0].bn1.running_mean
        assert not torch.equal(l4, torch.zeros_like(l4))


def test_unfrozen_model_trains_everything(backbone):
    model = _model(backbone, "none")
    set_train_mode(model, "none")
    assert all(p.requires_grad for p in model.parameters())
    assert model.backbone.training


def test_head_shape_and_feature_norm(backbone):
    plain = build_model("resnet50", 5, HeadSpec(hidden=8, dropout=0.0, feature_norm=False),
                        backbone)
    normed = build_model("resnet50", 5, HeadSpec(hidden=8, dropout=0.0, feature_norm=True),
                         backbone)
    assert isinstance(normed.head[0], torch.nn.BatchNorm1d) and not normed.head[0].affine
    assert isinstance(plain.head[0], torch.nn.Linear)
    assert plain.head[0].in_features == 2048 and plain.head[-2].out_features == 5
    x = torch.randn(3, 2048)
    out = plain.head.eval()(x)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))  # log-probabilities


def test_state_digest_sees_every_value(backbone):
    a = build_model("resnet50", 2, HeadSpec(hidden=4), backbone)
    digest = state_digest(a)
    assert digest == state_digest(a)
    with torch.no_grad():
        a.backbone.bn1.running_mean[0] += 1  # a buffer, not a parameter
    assert state_digest(a) != digest
