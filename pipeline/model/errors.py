"""Errors of the model package whose message tells the user what to do.

The package is carried by every logged model and imports nothing else from ``pipeline``, so
its errors have their own base; the stages treat :class:`ModelError` like ``PipelineError``.
"""


class ModelError(Exception):
    """A problem with a model's weights, card or inputs that the user can fix."""


class WeightsError(ModelError):
    """Pretrained weights are unavailable (offline and not cached) or a state dict is invalid."""


class ImageDecodeError(ModelError, ValueError):
    """An input could not be decoded as an image; the message says which and why."""


class ModelCardError(ModelError, ValueError):
    """A model card is missing, malformed or from an unknown format."""
