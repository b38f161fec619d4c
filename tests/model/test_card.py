"""The model card: written once, read back whole, and refused clearly in another shape."""

import json

import pytest
import torch

from pipeline.model.card import ModelCard
from pipeline.model.errors import ModelCardError
from pipeline.model.network import HeadSpec, backbone_digest, build_model, state_digest
from pipeline.model.presets import Preprocessing

CARD = ModelCard(arch="resnet50", classes=("apple_pie", "bibimbap", "churros"), image_size=64,
                 head=HeadSpec(hidden=16, dropout=0.1, feature_norm=True),
                 weights="none (random init, seed 0)", precision="fp32",
                 preprocessing=Preprocessing.for_size(64), run_id="abc123")


def test_round_trip(tmp_path):
    path = CARD.write(tmp_path / "card.json")
    assert ModelCard.read(path) == CARD
    raw = json.loads(path.read_text())
    assert raw["format"] == 1 and raw["classes"] == ["apple_pie", "bibimbap", "churros"]
    assert raw["head"] == {"hidden": 16, "dropout": 0.1, "feature_norm": True}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("classes"), "missing fields \\['classes'\\]"),
        (lambda r: r.update(colour="red"), "unknown fields \\['colour'\\]"),
        (lambda r: r.update(format=2), "card format 2"),
        (lambda r: r.update(image_size="big"), "image_size='big' is not of type int"),
        (lambda r: r["head"].pop("hidden"), "head: missing fields \\['hidden'\\]"),
    ],
)
def test_wrong_shapes_are_refused_with_the_reason(tmp_path, edit, message):
    raw = json.loads(CARD.to_json())
    edit(raw)
    (tmp_path / "card.json").write_text(json.dumps(raw))
    with pytest.raises(ModelCardError, match=message):
        ModelCard.read(tmp_path / "card.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="not JSON"):
        ModelCard.read(tmp_path / "bad.json")


def test_build_network_from_a_state_dict(backbone):
    torch.manual_seed(1)
    trained = build_model("resnet50", 3, CARD.head, backbone)
    net = CARD.build_network(trained.state_dict())
    assert not net.training
    assert state_digest(net) == state_digest(trained)
    with pytest.raises(RuntimeError, match="Missing key"):
        CARD.build_network({k: v for k, v in trained.state_dict().items()
                            if not k.startswith("head.")})


def test_build_head_alone_from_the_whole_state_dict(backbone):
    """What scoring cached features builds: the trained head, no backbone; and the backbone's
    digest (the feature cache's key) read off the state dict equals the built backbone's."""
    torch.manual_seed(1)
    trained = build_model("resnet50", 3, CARD.head, backbone).eval()
    state = trained.state_dict()
    head = CARD.build_head(state)
    assert not head.training
    assert state_digest(head) == state_digest(trained.head)
    x = torch.randn(4, 2048)
    with torch.inference_mode():
        torch.testing.assert_close(head(x), trained.head(x), rtol=0, atol=0)
    assert backbone_digest(state) == state_digest(trained.backbone)
    assert backbone_digest(state) != backbone_digest(
        {**state, "backbone.conv1.weight": state["backbone.conv1.weight"] + 1})
    with pytest.raises(RuntimeError, match="Missing key"):
        CARD.build_head({k: v for k, v in state.items() if k != "head.1.weight"})
