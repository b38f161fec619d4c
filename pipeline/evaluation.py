"""Test metrics, always against the true labels (scikit-learn), and their pictures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``test_accuracy``, ``test_top5_accuracy``, ``test_macro_f1`` for [N] labels, [N,C] scores."""
    y_true = np.asarray(y_true)
    n_classes = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    return {
        "test_accuracy": float(accuracy_score(y_true, y_pred)),
        # With 5 classes or fewer every label is in the top 5.
        "test_top5_accuracy": float(
            top_k_accuracy_score(y_true, probs, k=5, labels=labels) if n_classes > 5 else 1.0
        ),
        "test_macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
    }


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support for every class."""
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(classes)), zero_division=0
    )
    return pd.DataFrame(
        {"class": classes, "precision": p, "recall": r, "f1": f, "support": s}
    ).round(4)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[C,C] counts: rows are true classes, columns predicted."""
    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> Path:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(history: pd.DataFrame, path: Path) -> Path:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
