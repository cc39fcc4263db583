"""fastai's ``ClassificationInterpretation`` as plain functions of predictions and targets.

``confusion_matrix`` (rows: actual, columns: predicted; counts or row-normalised),
``most_confused(min_val)`` (off-diagonal cells, largest first), ``top_losses`` (per-image loss,
largest first, with the predicted class and its probability) and the classification report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def confusion_matrix(
    probs: np.ndarray, targets: np.ndarray, n_classes: int, *, normalize: bool = False
) -> np.ndarray:
    """Counts of (actual, predicted) pairs; ``normalize`` divides each row by its total."""
    cm = skm.confusion_matrix(
        np.asarray(targets), np.asarray(probs).argmax(1), labels=list(range(n_classes))
    )
    if not normalize:
        return cm
    totals = cm.sum(1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)


def most_confused(
    probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], min_val: int = 1
) -> list[tuple[str, str, int]]:
    """fastai's ``most_confused``: (actual, predicted, count) off the diagonal, count >= min_val."""
    cm = confusion_matrix(probs, targets, len(classes))
    cells = [
        (classes[a], classes[p], int(cm[a, p]))
        for a in range(len(classes))
        for p in range(len(classes))
        if a != p and cm[a, p] >= min_val
    ]
    return sorted(cells, key=lambda c: -c[2])  # stable: ties keep (actual, predicted) order


def top_losses(probs: np.ndarray, targets: np.ndarray, k: int | None = None) -> list[dict]:
    """Images by cross-entropy loss, largest first: index, loss, predicted, its probability."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    losses = -np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0))
    order = np.argsort(-losses, kind="stable")[: k if k is not None else len(y)]
    return [
        {
            "index": int(i),
            "loss": float(losses[i]),
            "predicted": int(p[i].argmax()),
            "actual": int(y[i]),
            "probability": float(p[i].max()),
        }
        for i in order
    ]


def classification_report(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str]) -> dict:
    """scikit-learn's classification report as a dict (per class, macro and weighted averages)."""
    return skm.classification_report(
        np.asarray(targets),
        np.asarray(probs).argmax(1),
        labels=list(range(len(classes))),
        target_names=list(classes),
        zero_division=0,
        output_dict=True,
    )
