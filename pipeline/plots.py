"""Pictures of the results (matplotlib, no display needed), returned as figures: the job logs
them to MLflow, the stage writes them as DVC plots (:func:`png_bytes`)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 110


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG (the same settings as what the job logs to MLflow); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def confusion_figure(cm: np.ndarray, classes: list[str], title: str = "") -> Figure:
    """A labelled confusion-matrix heat map (row-normalised colours, raw counts) as PNG."""
    n = len(classes)
    size = max(5.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 40:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                            color=colour)
    ax.set_title(title or "Confusion matrix (test set)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
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
