"""Test metrics, always against the true labels (scikit-learn)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
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


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """``class``, ``accuracy`` (the share of its test images labelled right: its recall) and
    ``support``, sorted worst first (ties by class name), for the sorted bar chart."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    support = np.bincount(y_true, minlength=len(classes))
    right = np.bincount(y_true[y_true == y_pred], minlength=len(classes))
    acc = np.divide(right, support, out=np.zeros(len(classes)), where=support > 0)
    frame = pd.DataFrame({"class": classes, "accuracy": acc.round(4), "support": support})
    return frame.sort_values(["accuracy", "class"], kind="stable").reset_index(drop=True)


def worst_predictions(y_true: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the ``k`` test images whose true class got the lowest probability
    (the most confidently wrong first; ties by row)."""
    y_true = np.asarray(y_true)
    p_true = probs[np.arange(len(y_true)), y_true]
    return np.lexsort((np.arange(len(y_true)), p_true))[:k]
