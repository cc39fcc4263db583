"""Classification metrics from predicted probabilities, computed with scikit-learn."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn import metrics as skm


def classification_metrics(
    probs: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray, classes: Sequence[str]
) -> dict:
    """Accuracy, error rate, cross-entropy, balanced accuracy and per-class P/R/F1 (JSON-ready)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum(1, keepdims=True).clip(min=1e-12)  # TTA's use_max rows do not sum to one
    y = np.asarray(targets, dtype=np.int64)
    labels = list(range(len(classes)))
    if len(y) == 0:
        raise ValueError("no predictions to score: the validation set is empty")
    pred = p.argmax(1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    accuracy = float(skm.accuracy_score(y, pred))
    return {
        "accuracy": accuracy,
        "error_rate": 1.0 - accuracy,
        "cross_entropy": float(skm.log_loss(y, np.clip(p, 1e-15, 1.0), labels=labels)),
        # scikit-learn's balanced_accuracy_score: mean recall over the classes present in the
        # validation set, from the recalls above (it warns "y_pred contains classes not in
        # y_true" for each absent class; split already names those classes in its warnings)
        "balanced_accuracy": float(recall[support > 0].mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "n": len(y),
    }
