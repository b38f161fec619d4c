"""The pictures: figures the job logs and the stage writes as PNG."""

import io

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.evaluation import confusion
from pipeline.plots import confusion_figure, learning_curves, png_bytes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 0, 2])
CLASSES = ["apple_pie", "bibimbap", "churros", "donuts"]


def _png(fig) -> Image.Image:
    data = png_bytes(fig)
    assert data[:8] == PNG_MAGIC
    return Image.open(io.BytesIO(data))


def test_confusion_figure_has_class_names_on_both_axes():
    fig = confusion_figure(confusion(Y_TRUE, Y_PRED, 4), CLASSES, "a title")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert ax.get_title() == "a title"
    img = _png(fig)
    assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_confusion_figure_grows_with_the_classes():
    n = 45  # above the 40-class limit for in-cell counts
    rng = np.random.default_rng(1)
    cm = confusion(rng.integers(0, n, 300), rng.integers(0, n, 300), n)
    small = _png(confusion_figure(confusion(Y_TRUE, Y_PRED, 4), CLASSES))
    big = _png(confusion_figure(cm, [f"class_{i}" for i in range(n)]))
    assert big.width > small.width


def test_learning_curves_plot_every_epoch():
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.2],
                            "val_loss": [1.8, 1.4, 1.3], "val_accuracy": [0.3, 0.5, 0.6]})
    fig = learning_curves(history)
    losses, acc = fig.axes
    assert [line.get_label() for line in losses.get_lines()] == ["train_loss", "val_loss"]
    assert list(acc.get_lines()[0].get_ydata()) == [0.3, 0.5, 0.6]
    assert _png(fig).width > 100
