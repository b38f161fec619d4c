"""The pictures: figures the job logs and the stage writes as PNG."""

import io

import numpy as np
import pandas as pd
from helpers import REPO
from PIL import Image

from pipeline.evaluation import confusion, per_class_accuracy
from pipeline.plots import (
    DPI,
    Misclassified,
    confusion_figure,
    learning_curves,
    per_class_accuracy_figure,
    png_bytes,
    worst_predictions_figure,
)

FOOD101_CLASSES = REPO.parent / "shared" / "datasets" / "food101-meta" / "classes.txt"

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


def _food101_classes() -> list[str]:
    """Food-101's 101 class names (the shared meta lists; a stand-in of the same lengths)."""
    if FOOD101_CLASSES.is_file():
        return FOOD101_CLASSES.read_text().split()
    return [f"class_name_{i:03d}_" + "x" * (i % 12) for i in range(101)]


def test_confusion_figure_is_readable_at_101_classes():
    classes = _food101_classes()
    n = len(classes)
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(n), 3)
    cm = confusion(y, np.where(rng.random(len(y)) < 0.5, y, rng.integers(0, n, len(y))), n)
    fig = confusion_figure(cm, classes)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == classes
    assert [t.get_text() for t in ax.get_yticklabels()] == classes
    assert not ax.texts  # no counts in 10,000 cells
    # one class per row: each row is taller than its label's font, nothing overlaps
    font_px = ax.get_yticklabels()[0].get_fontsize() / 72 * fig.dpi
    fig.canvas.draw()
    row_px = ax.get_window_extent().height / n
    assert row_px > font_px
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert all(a.y0 >= b.y1 or b.y0 >= a.y1 for a, b in zip(boxes, boxes[1:], strict=False))
    assert fig.get_tightbbox(renderer).x0 >= 0  # the names are not cut off at the left
    small = confusion_figure(confusion(Y_TRUE, Y_PRED, 4), CLASSES)
    widths = [f.get_size_inches()[0] * DPI for f in (small, fig)]
    assert widths[0] < widths[1] < 2500  # pixels: grows with the classes, within reason


def test_pictures_are_byte_identical_when_nothing_changed():
    """DVC outputs: re-running a stage on the same inputs must not change the files."""
    cm = confusion(Y_TRUE, Y_PRED, 4)
    assert png_bytes(confusion_figure(cm, CLASSES)) == png_bytes(confusion_figure(cm, CLASSES))
    table = per_class_accuracy(Y_TRUE, Y_PRED, CLASSES)
    assert png_bytes(per_class_accuracy_figure(table, 0.5)) == \
        png_bytes(per_class_accuracy_figure(table, 0.5))


def test_per_class_accuracy_bars_are_sorted_worst_first():
    table = per_class_accuracy(Y_TRUE, Y_PRED, CLASSES)
    fig = per_class_accuracy_figure(table.sample(frac=1, random_state=0), overall=4 / 6)
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names == ["donuts", "apple_pie", "churros", "bibimbap"]  # 0 (no images), .5, .5, 1
    widths = [p.get_width() for p in ax.patches]
    assert widths == [0.0, 0.5, 0.5, 1.0]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # the first (worst) bar is drawn at the top
    assert "overall 0.667" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert _png(fig).height > 100


def test_worst_predictions_grid_shows_true_and_predicted_labels():
    img = Image.new("RGB", (90, 60), (200, 30, 30))
    items = [Misclassified(img, "apple_pie", "churros", 0.91, 0.000021),
             Misclassified(img, "bibimbap", "bibimbap", 0.55, 0.55),
             Misclassified(img, "donuts", "churros", 0.40, 0.30)]
    fig = worst_predictions_figure(items, columns=2)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["true: apple_pie\npred: churros (0.91)\np(true) = 2.1e-05",
                          "true: bibimbap\npred: bibimbap (0.55)\np(true) = 0.55",
                          "true: donuts\npred: churros (0.40)\np(true) = 0.3"]
    colours = [ax.title.get_color() for ax in fig.axes[:3]]
    assert colours[0] == colours[2] != colours[1]  # wrong ones red, the right one green
    assert [ax.images[0].get_array().shape[:2] for ax in fig.axes[:3]] == [(128, 128)] * 3
    assert len(fig.axes) == 3  # a 2x2 grid, the last cell empty
    rows = sorted({round(ax.get_position().y0, 3) for ax in fig.axes})
    assert len(rows) == 2
    assert _png(worst_predictions_figure([])).width > 100  # an empty test set still draws


def test_learning_curves_plot_every_epoch():
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.2],
                            "val_loss": [1.8, 1.4, 1.3], "val_accuracy": [0.3, 0.5, 0.6]})
    fig = learning_curves(history)
    losses, acc = fig.axes
    assert [line.get_label() for line in losses.get_lines()] == ["train_loss", "val_loss"]
    assert list(acc.get_lines()[0].get_ydata()) == [0.3, 0.5, 0.6]
    assert _png(fig).width > 100
