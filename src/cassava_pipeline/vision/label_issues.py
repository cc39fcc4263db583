"""Suspected mislabels from out-of-fold probabilities, by cleanlab's confident learning.

``cleanlab.filter.find_label_issues`` estimates, from probabilities of models that never trained
on the image (out-of-fold), which given labels are likely wrong; the suspects are ranked by
self-confidence (the probability the model gives the label as given: lowest first). This is
cleanlab's method, called as documented, not a hand-written ranking.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues

from .folds import HELD_OUT
from .shards import ShardedImages

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
    # n_jobs=1: cleanlab's default forks a multiprocessing pool per call, inside a process with
    # torch's and Arrow's threads running; a pool worker was seen deadlocked on the pool's
    # queue lock (kedro run hung in out_of_fold). One process is quick at these sizes.
    ranked = find_label_issues(labels, p, return_indices_ranked_by="self_confidence", n_jobs=1)
    return pd.DataFrame(
        {
            "image": [images[i] for i in ranked],
            "given_label": [classes[labels[i]] for i in ranked],
            "suggested_label": [classes[int(p[i].argmax())] for i in ranked],
            "self_confidence": p[ranked, labels[ranked]],
            "rank": np.arange(1, len(ranked) + 1),
        }
    )


LabelAction = Literal["keep", "drop", "relabel"]


def revise_labels(
    folded: pd.DataFrame,
    issues: pd.DataFrame,
    classes: list[str],
    action: LabelAction,
    limit: int | None = None,
) -> pd.DataFrame:
    """What a training round does with the suspects of :func:`label_issues`: every image of
    ``folded`` (``path, label, fold``; fold -1 the held-out side) as ``path, label, is_valid,
    revision``: ``keep`` leaves the labels as given, ``drop`` marks the suspects ``dropped``
    (they do not train), ``relabel`` gives them the suggested label (``relabelled``). The
    held-out side is never revised: it validates, with its labels as given. ``limit``: only
    the first that many suspects by ``rank`` (most suspect first) are revised; ``None``: all.

    The suspects must be training images whose given label is still theirs; otherwise the
    issues were found on other folds or labels, and revising with them would be wrong.
    """
    revision = pd.DataFrame(
        {
            "path": folded["path"].astype(str).to_numpy(),
            "label": folded["label"].to_numpy(dtype=np.int64),
            "is_valid": (folded["fold"] == HELD_OUT).to_numpy(),
            "revision": "",
        }
    )
    if limit is not None:
        if limit < 0:
            raise ValueError(f"a limit of {limit} label issues: give 0 or more, or none for all")
        issues = issues.sort_values("rank", kind="stable").head(limit)
    if action == "keep" or issues.empty:
        return revision
    training = pd.Series(
        np.flatnonzero(~revision["is_valid"]), index=revision.loc[~revision["is_valid"], "path"]
    )
    found = training.reindex(issues["image"].astype(str))
    rows = found.fillna(-1).to_numpy(dtype=np.int64)
    labels = revision["label"].to_numpy()
    given = [classes[labels[r]] if r >= 0 else None for r in rows]
    wrong = [
        image
        for image, row, was, now in zip(
            issues["image"], rows, issues["given_label"].astype(str), given, strict=True
        )
        if row < 0 or was != now
    ]
    if wrong:
        raise ValueError(
            f"{len(wrong)} label issue(s) are not training images with the label given there "
            f"(e.g. {wrong[0]}): they were found on other folds or labels. Rerun the "
            "cross-validation (kedro run --pipelines=cassava_cv) before revising labels."
        )
    if action == "drop":
        revision.loc[rows, "revision"] = "dropped"
    else:
        unknown = set(issues["suggested_label"]) - set(classes)
        if unknown:
            raise ValueError(f"suggested labels {sorted(unknown)} are not classes {classes}")
        suggested = [classes.index(c) for c in issues["suggested_label"]]
        revision.loc[rows, "label"] = suggested
        revision.loc[rows, "revision"] = "relabelled"
    return revision


def revised_view(shards: ShardedImages, revision: pd.DataFrame, name: str) -> ShardedImages:
    """The images of ``shards`` as :func:`revise_labels` left them: the dropped ones out, the
    revised labels in, the held-out side as validation; a view called ``name`` over the same
    shard files (nothing copied), whose ``split`` digest covers the labels it trains on."""
    by_path = revision.set_index("path")
    paths = shards.index["path"].astype(str)
    missing = ~paths.isin(by_path.index)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} presized image(s) are not in the label revision (e.g. "
            f"{paths[missing].iat[0]}): it was made from another split; rerun the "
            "cross-validation (kedro run --pipelines=cassava_cv)."
        )
    rows = by_path.loc[paths]
    kept = np.flatnonzero((rows["revision"] != "dropped").to_numpy())
    return shards.subset(kept).resplit(
        rows["is_valid"].to_numpy()[kept], name=name, labels=rows["label"].to_numpy()[kept]
    )
