"""Inference: the folded backbone and batch inference from bytes (the device and precision
policy is in test_devices.py)."""

import numpy as np
import torch

from pipeline.model import devices
from pipeline.model.card import ModelCard
from pipeline.model.inference import (
    Classifier,
    extract_features,
    inference_backbone,
    load_classifier,
)
from pipeline.model.network import HeadSpec, build_model
from pipeline.model.presets import (
    Preprocessing,
    eval_pixels,
    eval_resize_crop,
    normalize_batch,
)


def test_folded_backbone_matches_eager_and_leaves_the_original_alone(backbone):
    backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        eager = backbone(x)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    folded = inference_backbone(backbone)
    feats = extract_features(folded, x, "fp32")
    torch.testing.assert_close(feats, eager, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert not any(p.requires_grad for p in folded.parameters())


def test_classifier_on_bytes_and_paths_in_batches(tiny_demo, backbone):
    torch.manual_seed(0)
    net = build_model("resnet50", 4, HeadSpec(hidden=8), backbone).eval()
    clf = Classifier(net, 32, "fp32")
    paths = sorted((tiny_demo / "images").rglob("*.jpg"))[:5]
    by_path = clf.log_probs([str(p) for p in paths], batch_size=2)
    by_bytes = clf.log_probs([p.read_bytes() for p in paths], batch_size=5)
    assert by_path.shape == (5, 4)
    torch.testing.assert_close(by_path, by_bytes)
    # the eager network on the eval preset gives the same answer
    from pipeline.model.imaging import load_image

    x = normalize_batch(np.stack([eval_pixels(load_image(p, min_side=32), eval_resize_crop(32))
                                  for p in paths]))
    with torch.inference_mode():
        eager = net(x)
    torch.testing.assert_close(by_path, eager, rtol=1e-3, atol=1e-3)
    assert np.array_equal(by_path.argmax(1).numpy(), eager.argmax(1).numpy())
    assert clf.log_probs([]).shape == (0, 4)


def test_a_model_trained_in_bf16_runs_at_the_consumers_precision(tiny_demo, monkeypatch,
                                                                  backbone):
    """The card says bf16 (say, trained on a GPU); on a CPU without native bf16 the model
    runs in fp32 (not emulated bf16), on one with it in bf16: resolved when it is loaded."""
    torch.manual_seed(0)
    net = build_model("resnet50", 4, HeadSpec(hidden=8), backbone).eval()
    card = ModelCard(arch="resnet50", classes=("a", "b", "c", "d"), image_size=32,
                     head=HeadSpec(hidden=8), weights="none", precision="bf16",
                     preprocessing=Preprocessing.for_size(32), run_id="r")
    paths = [str(p) for p in sorted((tiny_demo / "images").rglob("*.jpg"))[:4]]
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: False)
    clf = load_classifier(card, net.state_dict(), "auto")  # no GPU here: the CPU
    assert (clf.device.type, clf.precision) == ("cpu", "fp32")
    fp32 = Classifier(net, 32, "fp32", "cpu").log_probs(paths)
    torch.testing.assert_close(clf.log_probs(paths), fp32)
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: True)
    assert load_classifier(card, net.state_dict(), "cpu").precision == "bf16"
