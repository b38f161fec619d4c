"""The transform presets: one eval preprocessing everywhere, bit-identical to what the feature
cache and every logged model were computed with."""

import numpy as np
import torch
from torchvision import transforms as v1

from pipeline.model.imaging import load_image
from pipeline.model.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    eval_pixels,
    eval_resize_crop,
    normalize_batch,
    train_resize_crop,
)


def _images(tiny_demo, n=8):
    return [load_image(p, min_side=40) for p in sorted((tiny_demo / "images").rglob("*.jpg"))[:n]]


def _v1_eval(size):
    """torchvision's v1 eval preset, what the feature cache was first computed with."""
    return v1.Compose([
        v1.Resize(size, interpolation=v1.InterpolationMode.BILINEAR, antialias=True),
        v1.CenterCrop(size), v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def test_batched_normalisation_is_the_v1_eval_transform_bit_for_bit(tiny_demo):
    images = _images(tiny_demo)
    reference = torch.stack([_v1_eval(40)(img) for img in images])
    resize_crop = eval_resize_crop(40)
    batched = normalize_batch(np.stack([eval_pixels(img, resize_crop) for img in images]))
    assert batched.is_contiguous(memory_format=torch.channels_last)
    assert batched.shape == (8, 3, 40, 40)
    assert torch.equal(batched, reference)
    single = torch.cat([normalize_batch(eval_pixels(img, resize_crop)[None]) for img in images])
    assert torch.equal(single, reference)


def test_train_preset_varies_and_keeps_the_size(tiny_demo):
    img = _images(tiny_demo, 1)[0]
    geometry = train_resize_crop(32)
    torch.manual_seed(0)
    a, b = (normalize_batch(eval_pixels(img, geometry)[None])[0] for _ in range(2))
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)  # random crop / flip


def test_preprocessing_spec_keys_the_feature_cache():
    spec = Preprocessing.for_size(128).as_dict()
    # the same keys and values as the spec the cache has always been keyed by
    assert spec == {"version": 1, "decode": "PIL, RGB, JPEG draft to >= image_size",
                    "resize": 128, "interpolation": "bilinear-antialias", "crop": 128,
                    "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
