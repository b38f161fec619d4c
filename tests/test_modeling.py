import urllib.error

import numpy as np
import pytest
import torch

from pipeline.imaging import load_image
from pipeline.modeling import (
    WeightsError,
    apply_freeze,
    build_backbone,
    build_model,
    eval_pixels,
    eval_transform,
    normalize_batch,
    resolve_precision,
    set_train_mode,
    state_digest,
)


def _bn_stats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


@pytest.mark.parametrize("freeze", ["backbone", "layer4"])
def test_frozen_backbone_batchnorm_statistics_do_not_move(freeze):
    backbone, _ = build_backbone("resnet50", "none", 0)
    model = build_model("resnet50", 3, 16, 0.2, backbone)
    apply_freeze(model, freeze)
    frozen = model.backbone if freeze == "backbone" else torch.nn.ModuleList(
        [m for n, m in model.backbone.named_children() if n != "layer4"])
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
    if freeze == "layer4":  # the unfrozen block does learn (and its BN does update)
        assert model.backbone.layer4.training
        l4 = model.backbone.layer4[0].bn1.running_mean
        assert not torch.equal(l4, torch.zeros_like(l4))


def test_unfrozen_model_trains_everything():
    backbone, _ = build_backbone("resnet50", "none", 0)
    model = build_model("resnet50", 3, 16, 0.2, backbone)
    apply_freeze(model, "none")
    set_train_mode(model, "none")
    assert all(p.requires_grad for p in model.parameters())
    assert model.backbone.training


def test_random_init_is_seeded():
    a, used = build_backbone("resnet50", "none", 0)
    b, _ = build_backbone("resnet50", "none", 0)
    c, _ = build_backbone("resnet50", "none", 1)
    assert "random init" in used
    assert state_digest(a) == state_digest(b) != state_digest(c)


def test_imagenet_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(WeightsError) as err:
        build_backbone("resnet50", "imagenet", 0)
    msg = str(err.value)
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert str(expected) in msg and "download.pytorch.org" in msg
    assert "model.weights=none" in msg


def test_state_dict_path(tmp_path):
    src, _ = build_backbone("resnet50", "none", 5)
    model = build_model("resnet50", 4, 8, 0.0, src)
    torch.save(model.state_dict(), tmp_path / "full.pt")  # a full FoodNet checkpoint
    loaded, used = build_backbone("resnet50", str(tmp_path / "full.pt"), 0)
    assert used.startswith("file ") and state_digest(loaded) == state_digest(src)
    with pytest.raises(WeightsError, match="no such file"):
        build_backbone("resnet50", str(tmp_path / "missing.pt"), 0)
    (tmp_path / "junk.pt").write_text("nope")
    with pytest.raises(WeightsError, match="not a torch state dict"):
        build_backbone("resnet50", str(tmp_path / "junk.pt"), 0)


def test_precision_policy(monkeypatch):
    import pipeline.modeling as m

    monkeypatch.setattr(m, "bf16_supported", lambda: False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(m, "bf16_supported", lambda: True)
    assert resolve_precision("auto") == "bf16"
    assert resolve_precision("fp32") == "fp32"


def test_batched_normalisation_is_the_eval_transform_bit_for_bit(tiny_demo):
    """Extraction and the logged model normalise whole uint8 batches; the result must be
    exactly torchvision's ToTensor + Normalize (so cached features stay valid)."""
    paths = sorted((tiny_demo / "images").rglob("*.jpg"))[:8]
    images = [load_image(p, min_side=40) for p in paths]
    reference = torch.stack([eval_transform(40)(img) for img in images])
    batched = normalize_batch(np.stack([eval_pixels(img, 40) for img in images]))
    assert batched.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batched, reference)
