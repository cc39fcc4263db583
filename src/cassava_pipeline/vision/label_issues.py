"""Suspected mislabels from out-of-fold probabilities, by cleanlab's confident learning.

``cleanlab.filter.find_label_issues`` estimates, from probabilities of models that never trained
on the image (out-of-fold), which given labels are likely wrong; the suspects are ranked by
self-confidence (the probability the model gives the label as given: lowest first). This is
cleanlab's method, called as documented, not a hand-written ranking.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues

ISSUE_COLUMNS = ("image", "given_label", "suggested_label", "self_confidence", "rank")


def label_issues(
    images: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """The suspects among ``images`` (their given ``labels``, out-of-fold ``probs`` of shape
    (n, len(classes))), most suspect first: :data:`ISSUE_COLUMNS`, ``rank`` from 1.

    Labels of a class no image carries are not an error (a tiny data set); probabilities are
    renormalised in float64 first, as cleanlab requires rows that sum to 1.
    """
    labels = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (len(images), len(classes)) or len(labels) != len(images):
        raise ValueError(
            f"{len(images)} images, {len(labels)} labels and probabilities of shape {p.shape} "
            f"for {len(classes)} classes do not fit together"
        )
    p = p / p.sum(axis=1, keepdims=True)
    if len(images) == 0:
        return pd.DataFrame(columns=list(ISSUE_COLUMNS))
    ranked = find_label_issues(labels, p, return_indices_ranked_by="self_confidence")
    return pd.DataFrame(
        {
            "image": [images[i] for i in ranked],
            "given_label": [classes[labels[i]] for i in ranked],
            "suggested_label": [classes[int(p[i].argmax())] for i in ranked],
            "self_confidence": p[ranked, labels[ranked]],
            "rank": np.arange(1, len(ranked) + 1),
        }
    )
