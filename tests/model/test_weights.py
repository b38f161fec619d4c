"""Where backbone weights come from: a seeded random init, ImageNet, or a state dict file."""

import urllib.error

import pytest
import torch

from pipeline.model.errors import WeightsError
from pipeline.model.network import HeadSpec, build_model, state_digest
from pipeline.model.weights import build_backbone


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
    model = build_model("resnet50", 4, HeadSpec(hidden=8, dropout=0.0), src)
    torch.save(model.state_dict(), tmp_path / "full.pt")  # a full FoodNet checkpoint
    loaded, used = build_backbone("resnet50", str(tmp_path / "full.pt"), 0)
    assert used.startswith("file ") and state_digest(loaded) == state_digest(src)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    # a half-precision checkpoint gives a float32 backbone (as copying into one would)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()},
               tmp_path / "half.pt")
    half, _ = build_backbone("resnet50", str(tmp_path / "half.pt"), 0)
    assert {t.dtype for t in half.parameters()} == {torch.float32}
    assert half.training and all(p.requires_grad for p in half.parameters())
    with pytest.raises(WeightsError, match="no such file"):
        build_backbone("resnet50", str(tmp_path / "missing.pt"), 0)
    (tmp_path / "junk.pt").write_text("nope")
    with pytest.raises(WeightsError, match="not a torch state dict"):
        build_backbone("resnet50", str(tmp_path / "junk.pt"), 0)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="does not fit resnet50"):
        build_backbone("resnet50", str(tmp_path / "other.pt"), 0)
