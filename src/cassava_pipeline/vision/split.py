"""Split a manifest into training and validation sides.

Either the layout's own split (``is_valid``), or a stratified random split with a seed and
``valid_pct``. Byte-identical files (same ``hash``) always land on the same side, so a duplicate
can never leak a validation image into training. Byte-identical files with different labels are
left out altogether unless ``keep_conflicting_duplicates``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd
from annotated_types import Gt, Lt

from .options import STRICT


class SplitError(ValueError):
    """The split cannot train a model (e.g. a class has no training image)."""


# Fewer training images than this in a class earns a warning: the model sees it a handful of
# times per epoch, and its validation figures rest on one or two images.
FEW_TRAINING_IMAGES = 5


@dataclass(frozen=True)
class SplitOptions:
    """How to split."""

    __pydantic_config__ = STRICT

    valid_pct: Annotated[float, Gt(0.0), Lt(1.0)] = 0.2  # fastai's RandomSplitter default
    seed: int = 42
    use_layout_split: bool = True  # use is_val / train+valid folders when the layout has them
    # Byte-identical files with different labels: at least one label is wrong, and which one
    # cannot be told; by default every copy is left out (of both sides), True keeps them.
    keep_conflicting_duplicates: bool = False


def split(
    manifest: pd.DataFrame, classes: list[str], options: SplitOptions
) -> tuple[pd.DataFrame, dict]:
    """Return the manifest with a boolean ``is_valid`` column filled in, and a split report."""
    if not 0.0 <= options.valid_pct < 1.0:
        raise SplitError(f"split.valid_pct must be in [0, 1), got {options.valid_pct}")
    df = manifest.reset_index(drop=True).copy()
    conflicting = _conflicting_label_groups(df, pd.factorize(df["hash"])[0])
    dropped = sorted(p for g in conflicting for p in g)
    if options.keep_conflicting_duplicates:
        dropped = []
    if dropped:
        df = df[~df["path"].isin(dropped)].reset_index(drop=True)
    given = df["is_valid"]
    use_layout = options.use_layout_split and len(df) and not given.isna().any()
    # Group byte-identical files: one group id per distinct hash, in first-seen order.
    group = pd.factorize(df["hash"])[0]
    n_groups = int(group.max()) + 1 if len(df) else 0
    dup_groups = int((np.bincount(group, minlength=n_groups) > 1).sum()) if len(df) else 0

    if use_layout:
        is_valid = given.astype(bool).to_numpy().copy()
        # A group seen on both sides goes to training: its validation copies are training data.
        on_train = np.zeros(n_groups, dtype=bool)
        np.logical_or.at(on_train, group, ~is_valid)
        moved = int((is_valid & on_train[group]).sum())
        is_valid &= ~on_train[group]
        method = "layout"
    else:
        is_valid = _stratified_group_split(df, group, n_groups, options)
        moved = 0
        method = "stratified_random"

    df["is_valid"] = is_valid
    report = _report(df, classes, method, options, dup_groups, moved, conflicting)
    report["conflicting_duplicates_excluded"] = dropped
    report["warnings"] = class_warnings(report)
    missing = [c["name"] for c in report["classes"] if c["train"] == 0]
    if missing:
        check_classes(report)  # the more useful message when fewer than two classes have images
        raise SplitError(
            f"Class(es) {missing} have no training image after the split "
            f"({method}). Add images of those classes, lower split.valid_pct, or move some of "
            "their validation images to training."
        )
    return df, report


def check_classes(report: dict) -> None:
    """Stop before training when a split report has images of fewer than two classes."""
    present = [c["name"] for c in report["classes"] if c["train"] + c["valid"] > 0]
    if len(present) < 2:
        found = f"only {present[0]!r}" if present else "none"
        raise SplitError(
            f"The data set has images of {len(present)} class(es) ({found}); a classifier needs "
            "at least two. Add a folder (or label) of images of another class, or check that "
            "data.raw and ingest.layout point at the whole data set."
        )


def class_warnings(report: dict) -> list[str]:
    """What a split report shows that will weaken training or its metrics: a class with no
    validation image (its accuracy cannot be measured) or very few training images."""
    out = []
    rows = [c for c in report["classes"] if c["train"] + c["valid"] > 0]
    if report["n_valid"] > 0:
        no_valid = [c["name"] for c in rows if c["valid"] == 0]
        if no_valid:
            out.append(
                f"class(es) {no_valid} have no validation image: their accuracy, recall and "
                "confusion rows are not measured. Add images of them, or raise split.valid_pct."
            )
    few = [f"{c['name']} ({c['train']})" for c in rows if 0 < c["train"] < FEW_TRAINING_IMAGES]
    if few:
        out.append(
            f"class(es) with fewer than {FEW_TRAINING_IMAGES} training images: {', '.join(few)}. "
            "The model will hardly learn them; add images, or merge or drop the class."
        )
    return out


def _stratified_group_split(
    df: pd.DataFrame, group: np.ndarray, n_groups: int, options: SplitOptions
) -> np.ndarray:
    rng = np.random.default_rng(options.seed)
    # A group is stratified by the label of its first file.
    first = np.full(n_groups, -1)
    first[group[::-1]] = np.arange(len(df))[::-1]
    group_label = df["label"].to_numpy()[first]
    group_size = np.bincount(group, minlength=n_groups)
    valid_group = np.zeros(n_groups, dtype=bool)
    for label in np.unique(group_label):
        members = np.flatnonzero(group_label == label)
        members = members[rng.permutation(len(members))]
        target = round(options.valid_pct * group_size[members].sum())
        taken = np.cumsum(group_size[members])
        # Take groups in random order while the validation side stays at or under the target,
        # but always leave at least one group for training.
        n_take = min(int(np.searchsorted(taken, target, side="right")), len(members) - 1)
        valid_group[members[:n_take]] = True
    return valid_group[group]


def _conflicting_label_groups(df: pd.DataFrame, group: np.ndarray) -> list[list[str]]:
    labels = pd.DataFrame({"g": group, "label": df["label"].to_numpy(), "path": df["path"]})
    per = labels.groupby("g")["label"].nunique()
    bad = per[per > 1].index
    return [sorted(labels.loc[labels["g"] == g, "path"].tolist()) for g in bad]


def _report(
    df: pd.DataFrame,
    classes: list[str],
    method: str,
    options: SplitOptions,
    dup_groups: int,
    moved: int,
    conflicting: list[list[str]],
) -> dict:
    rows = []
    for i, name in enumerate(classes):
        sel = df["label"] == i
        rows.append(
            {
                "index": i,
                "name": name,
                "train": int((sel & ~df["is_valid"]).sum()),
                "valid": int((sel & df["is_valid"]).sum()),
            }
        )
    return {
        "method": method,
        "valid_pct": options.valid_pct if method != "layout" else None,
        "seed": options.seed if method != "layout" else None,
        "n_train": int((~df["is_valid"]).sum()),
        "n_valid": int(df["is_valid"].sum()),
        "duplicate_groups": dup_groups,
        "duplicates_moved_to_train": moved,
        "duplicates_with_conflicting_labels": conflicting,
        "classes": rows,
    }
