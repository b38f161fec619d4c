"""The transform presets (torchvision's ``references/classification/presets.py`` shape): one
eval preset used by feature extraction, evaluation, prediction and the logged model, and one
train preset for ``train.augment``. Sizes come from the model card or the config.

A preset is its geometry (:func:`eval_resize_crop`, :func:`train_resize_crop`: torchvision's
transforms v2 on PIL images, per image, in the decoding workers) and :func:`normalize_batch`
(per batch, on the device). :func:`normalize_batch` is not ``v2.ToDtype(scale=True)`` +
``v2.Normalize``: v2 scales by multiplying with 1/255 where ``ToTensor`` divided by 255,
which changes the last bit of some values, and every feature cached so far (and the accuracy
of every logged model) was computed with the division.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bumped whenever the preprocessing code changes in a way the fields below do not show, so
# cached features computed by older code can never be reused.
PREPROCESSING_VERSION = 1


@dataclass(frozen=True)
class Preprocessing:
    """Everything that determines the eval preprocessing (part of the feature-cache key and of
    the model card)."""

    resize: int
    crop: int
    version: int = PREPROCESSING_VERSION
    decode: str = "PIL, RGB, JPEG draft to >= image_size"
    interpolation: str = "bilinear-antialias"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_size(cls, image_size: int) -> Preprocessing:
        """Resize the shorter side to ``image_size``, then centre-crop a square of it."""
        return cls(resize=image_size, crop=image_size)

    def as_dict(self) -> dict:
        return asdict(self)


def eval_resize_crop(image_size: int) -> v2.Compose:
    """The geometric half of the eval preset: PIL RGB -> PIL RGB of S x S."""
    from torchvision.transforms import v2  # here: importing torchvision costs ~1.1 s (network.py)

    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


def eval_pixels(img: Image.Image, resize_crop: v2.Compose) -> np.ndarray:
    """A decoded RGB PIL image -> its [S,S,3] uint8 pixels after ``resize_crop``."""
    return np.array(resize_crop(img))  # a writable copy: torch.as_tensor wants one


def normalize_batch(pixels: np.ndarray | torch.Tensor,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """[N,S,S,3] uint8 pixels -> [N,3,S,S] float32 in channels_last memory, ImageNet-normalised,
    on ``device`` (default: where ``pixels`` are).

    The same arithmetic as torchvision's ``ToTensor`` + ``Normalize`` (bit for bit on the CPU,
    tested), once per batch: uint8 crosses from a decoding worker and to a GPU (4x less than
    float32; ``non_blocking`` from pinned memory), and NHWC pixels are already the
    channels_last layout the network runs in.
    """
    x = torch.as_tensor(pixels)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.float().div(255).sub(mean).div(std).contiguous(memory_format=torch.channels_last)


def train_resize_crop(image_size: int) -> v2.Compose:
    """The geometric half of the train preset (``train.augment``), torchvision's recipe shape:
    a random resized crop (50-100 % of the area, 3/4-4/3 aspect) and a horizontal flip."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )

