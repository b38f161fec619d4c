"""Pictures of the results (matplotlib, no display needed), returned as figures: the job logs
them to MLflow, the stage writes them as DVC plots (:func:`png_bytes`).

Every figure is sized from what it shows (classes, images), so that it stays readable from 4
to 101 classes, and drawn deterministically: the same inputs give the same PNG bytes (DVC
outputs must not change when nothing did).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

DPI = 110
WRONG, RIGHT = "#c0392b", "#1e8449"  # caption colours of the image grid


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG; closes it. The jobs render each figure once: these bytes go to the
    MLflow run and to the stage's plots/ file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _label_font(n: int) -> float:
    """Tick-label size for ``n`` class names: small enough that 101 rows do not overlap."""
    return 8.0 if n <= 20 else 7.0 if n <= 40 else 6.0


def _text_inches(labels: Sequence[str], fontsize: float) -> float:
    """A generous width estimate of the longest label, in inches."""
    longest = max((len(s) for s in labels), default=0)
    return longest * fontsize * 0.62 / 72


def confusion_figure(cm: np.ndarray, classes: list[str], title: str = "") -> Figure:
    """Confusion matrix [C,C] (rows true, columns predicted) as a heat map: colours are the
    share of each true class, class names on both axes; counts in the cells up to 30 classes,
    a light grid above that so a row can be followed across (readable at 101 classes)."""
    n = len(classes)
    cell = max(0.45, 2.6 / max(n, 1)) if n <= 20 else max(0.14, 9.0 / n)  # inches per class
    font = _label_font(n)
    # Laid out in inches (not tight_layout): the names get all the room they need at any n.
    labels = _text_inches(classes, font) + 0.45  # tick labels + axis label
    side, title_h, bar_w = n * cell, 0.5, 1.15  # bar_w: gap, colour bar and its labels
    width, height = labels + side + bar_w, labels + side + title_h
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((labels / width, labels / height, side / width, side / height))
    cax = fig.add_axes(((labels + side + 0.15) / width, labels / height, 0.18 / width,
                        side / height))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_xticks(range(n), classes, rotation=90, fontsize=font)
    ax.set_yticks(range(n), classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                            fontsize=6 if n > 12 else 7, color=colour)
    else:
        ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="#d9d9d9", linewidth=0.3)
        ax.tick_params(which="minor", length=0)
    ax.set_title(title or "Confusion matrix (test set)", fontsize=10)
    fig.colorbar(im, cax=cax, label="share of the true class")
    return fig


def per_class_accuracy_figure(per_class: pd.DataFrame, overall: float | None = None,
                              title: str = "") -> Figure:
    """Per-class accuracy (recall) as horizontal bars sorted worst first (at the top), with
    each class's test support, the overall accuracy and chance level.

    ``per_class``: columns ``class``, ``accuracy`` and ``support``, in any order.
    """
    df = per_class.sort_values(["accuracy", "class"], kind="stable").reset_index(drop=True)
    n = len(df)
    font = _label_font(n)
    margin = _text_inches(df["class"], font) + 0.3
    fig, ax = plt.subplots(figsize=(6.5 + margin, 0.17 * n + 1.4))
    y = np.arange(n)
    colours = plt.get_cmap("RdYlGn")(df["accuracy"].to_numpy() * 0.85 + 0.075)
    ax.barh(y, df["accuracy"], color=colours, height=0.8)
    for yi, (acc, support) in enumerate(zip(df["accuracy"], df["support"], strict=True)):
        ax.text(min(acc, 1.0) + 0.01, yi, f"{acc:.2f}  (n={int(support)})", va="center",
                fontsize=max(font - 1, 5.5))
    ax.set_yticks(y, df["class"], fontsize=font)
    ax.set_ylim(n - 0.5, -0.5)  # worst at the top
    ax.set_xlim(0, 1.22)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("accuracy on the class's test images (recall)")
    if overall is not None:
        ax.axvline(overall, color="black", linestyle="--", linewidth=1,
                   label=f"overall {overall:.3f}")
    if n:
        ax.axvline(1 / n, color="grey", linestyle=":", linewidth=1, label=f"chance {1 / n:.3f}")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "Per-class accuracy (test set), worst first", fontsize=10)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Misclassified:
    """One test image for :func:`worst_predictions_figure`."""

    image: Image.Image
    true: str
    predicted: str
    confidence: float  # the probability of the predicted class
    true_probability: float  # the probability the model gave the true class


def worst_predictions_figure(items: Sequence[Misclassified], title: str = "",
                             columns: int = 4, thumb: int = 128) -> Figure:
    """A grid of test images (centre-cropped, as the model sees them, drawn pixel for pixel)
    with true and predicted labels (red: wrong, green: right), in the given order (the job
    passes them worst first)."""
    k = len(items)
    cols = max(1, min(columns, k))
    rows = max(1, math.ceil(k / cols))
    side = thumb / DPI  # inches: one image pixel per PNG pixel (sharp, and a small file)
    cell_w, cell_h, top = max(1.75, side + 0.2), side + 0.6, 0.4
    width, height = cols * cell_w, rows * cell_h + top
    fig = plt.figure(figsize=(width, height))
    for n, item in enumerate(items):
        r, c = divmod(n, cols)
        left = c * cell_w + (cell_w - side) / 2
        bottom = height - top - (r + 1) * cell_h + 0.05
        ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
        ax.imshow(np.asarray(ImageOps.fit(item.image, (thumb, thumb))), interpolation="nearest")
        ax.axis("off")
        wrong = item.true != item.predicted
        ax.set_title(f"true: {item.true}\npred: {item.predicted} ({item.confidence:.2f})\n"
                     f"p(true) = {item.true_probability:.2g}", fontsize=6.5, pad=3,
                     color=WRONG if wrong else RIGHT)
    if not k:
        fig.text(0.5, 0.4, "no test images", ha="center", va="center")
    fig.suptitle(title or "Worst-classified test images (lowest probability of the true class)",
                 fontsize=10, y=1 - 0.12 / height, va="top")
    return fig


def learning_curves(history: pd.DataFrame) -> Figure:
    """Per-epoch losses and validation accuracy as PNG."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(history["epoch"], history["train_loss"], "o-", label="train_loss")
    a1.plot(history["epoch"], history["val_loss"], "o-", label="val_loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel("NLL loss")
    a1.legend()
    a2.plot(history["epoch"], history["val_accuracy"], "o-", color="tab:green")
    a2.set_xlabel("epoch")
    a2.set_ylabel("val_accuracy")
    a2.set_ylim(0, 1)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.set_xticks(history["epoch"])
    fig.tight_layout()
    return fig
