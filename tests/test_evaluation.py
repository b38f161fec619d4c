"""Test metrics against true labels, the per-class report and the confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pipeline.evaluation import classification_metrics, confusion, per_class_report


def balanced_labels(n_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def ranked_probs(n: int, order: list[int]) -> np.ndarray:
    """[n, C] scores that rank classes as ``order`` (first = argmax) for every row, no ties."""
    c = len(order)
    row = np.empty(c)
    for rank, cls in enumerate(order):
        row[cls] = c - rank
    row /= row.sum()
    return np.tile(row, (n, 1))


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    probs = np.full((len(labels), n_classes), 0.01)
    probs[np.arange(len(labels)), labels] = 1.0
    return probs / probs.sum(axis=1, keepdims=True)


def test_one_class_predictor_scores_one_over_c_against_true_labels():
    c, per_class = 4, 10
    y = balanced_labels(c, per_class)
    probs = ranked_probs(len(y), [0, 1, 2, 3])  # always predicts class 0
    m = classification_metrics(y, probs)

    assert set(m) == {"test_accuracy", "test_top5_accuracy", "test_macro_f1"}
    assert m["test_accuracy"] == pytest.approx(1 / c)
    # with C=4, "top-5" is top-4: every true label is in it
    assert m["test_top5_accuracy"] == pytest.approx(1.0)
    assert m["test_top5_accuracy"] >= m["test_accuracy"]
    # By hand: class 0 has precision 10/40, recall 1 -> F1 = 2*0.25/1.25 = 0.4; the three
    # classes never predicted have F1 0 -> macro F1 = 0.4 / 4 = 0.1.
    assert m["test_macro_f1"] == pytest.approx(0.1)
    y_pred = probs.argmax(1)
    assert m["test_macro_f1"] == pytest.approx(
        f1_score(y, y_pred, labels=np.arange(c), average="macro", zero_division=0))
    assert all(isinstance(v, float) for v in m.values())


def test_perfect_scores_are_one_and_shifted_predictions_are_zero():
    c = 6
    y = balanced_labels(c, 5)
    perfect = classification_metrics(y, one_hot(y, c))
    assert perfect == {"test_accuracy": 1.0, "test_top5_accuracy": 1.0, "test_macro_f1": 1.0}

    # predictions are a permutation of the labels: if accuracy compared predictions with
    # themselves (or with a shuffled copy) this would not be 0
    wrong = classification_metrics(y, one_hot((y + 1) % c, c))
    assert wrong["test_accuracy"] == 0.0
    assert wrong["test_macro_f1"] == 0.0
    assert wrong["test_top5_accuracy"] >= wrong["test_accuracy"]


def test_top5_counts_the_five_best_scores():
    c = 10
    y = balanced_labels(c, 3)
    # every row ranks 0 > 1 > ... > 9: top-1 hits class 0 only, top-5 hits classes 0..4
    m = classification_metrics(y, ranked_probs(len(y), list(range(c))))
    assert m["test_accuracy"] == pytest.approx(0.1)
    assert m["test_top5_accuracy"] == pytest.approx(0.5)
    assert m["test_top5_accuracy"] >= m["test_accuracy"]


def test_top5_on_random_scores_is_at_least_accuracy():
    rng = np.random.default_rng(0)
    c = 8
    y = rng.integers(0, c, 200)
    probs = rng.dirichlet(np.ones(c), size=200)
    m = classification_metrics(y, probs)
    assert m["test_accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert m["test_top5_accuracy"] == pytest.approx(float((top5 == y[:, None]).any(1).mean()))
    assert m["test_top5_accuracy"] >= m["test_accuracy"]


def test_five_classes_or_fewer_top5_is_always_right():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    m = classification_metrics(y, probs)
    assert m["test_accuracy"] == pytest.approx(0.5)
    assert m["test_top5_accuracy"] == 1.0  # both labels are always among the top 5


def test_classes_absent_from_test_set_still_count_in_macro_f1():
    # 3 classes in the scores, only classes 0 and 1 in the labels, both predicted right
    y = np.array([0, 0, 1, 1])
    probs = one_hot(y, 3)
    m = classification_metrics(y, probs)
    assert m["test_accuracy"] == 1.0
    assert m["test_macro_f1"] == pytest.approx(2 / 3)  # class 2 has F1 0 (zero_division=0)


# -- per-class report and confusion matrix on a hand-made example ------------------------------

Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 0, 2])
CLASSES = ["apple_pie", "bibimbap", "churros", "donuts"]  # donuts: no samples, never predicted


def test_per_class_report_values():
    rep = per_class_report(Y_TRUE, Y_PRED, CLASSES)
    assert list(rep.columns) == ["class", "precision", "recall", "f1", "support"]
    assert rep.shape == (4, 5)
    assert rep["class"].tolist() == CLASSES
    rows = rep.set_index("class")
    # apple_pie: predicted at 0 and 4, right once; true at 0 and 1
    assert rows.loc["apple_pie", ["precision", "recall", "f1"]].tolist() == [0.5, 0.5, 0.5]
    # bibimbap: predicted at 1, 2, 3, right twice; both true ones found
    assert rows.loc["bibimbap", "precision"] == pytest.approx(0.6667)
    assert rows.loc["bibimbap", "recall"] == pytest.approx(1.0)
    assert rows.loc["bibimbap", "f1"] == pytest.approx(0.8)
    # churros: predicted once (right), one of two found
    assert rows.loc["churros", "precision"] == pytest.approx(1.0)
    assert rows.loc["churros", "recall"] == pytest.approx(0.5)
    assert rows.loc["churros", "f1"] == pytest.approx(0.6667)
    assert rows.loc["donuts", ["precision", "recall", "f1", "support"]].tolist() == [0, 0, 0, 0]
    assert rows["support"].tolist() == [2, 2, 2, 0]


def test_confusion_rows_are_true_columns_predicted():
    cm = confusion(Y_TRUE, Y_PRED, len(CLASSES))
    assert cm.shape == (4, 4)
    expected = np.array([
        [1, 1, 0, 0],
        [0, 2, 0, 0],
        [1, 0, 1, 0],
        [0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == len(Y_TRUE)
    np.testing.assert_array_equal(cm.sum(axis=1), [2, 2, 2, 0])  # row sums = support


def test_per_class_accuracy_is_each_class_recall_sorted_worst_first():
    from pipeline.evaluation import per_class_accuracy

    y_true = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 1, 0, 0, 0])
    table = per_class_accuracy(y_true, y_pred, ["apple_pie", "bibimbap", "churros", "donuts"])
    assert table.to_dict(orient="list") == {
        "class": ["churros", "donuts", "apple_pie", "bibimbap"],  # ties by name
        "accuracy": [0.0, 0.0, 0.5, 0.75],
        "support": [2, 0, 2, 4],  # a class without test images scores 0, not NaN
    }


def test_worst_predictions_are_the_lowest_true_class_probabilities():
    from pipeline.evaluation import worst_predictions

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    y_true = np.array([0, 0, 1, 0, 1])  # p(true): 0.9, 0.2, 0.4, 0.2, 0.5
    assert worst_predictions(y_true, probs, 3).tolist() == [1, 3, 2]  # ties by row
    assert worst_predictions(y_true, probs, 10).tolist() == [1, 3, 2, 4, 0]
