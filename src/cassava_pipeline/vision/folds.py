"""Stratified k-fold cross-validation over the training side of a split manifest.

Every training image gets one fold in ``0 .. folds-1`` (scikit-learn's ``StratifiedGroupKFold``:
each fold's class mix as close to the whole's as the groups allow); byte-identical files (same
``hash``) share a group, so a duplicate never sits in a fold's validation while its copy trains,
as the split already keeps them on one side. The split's validation side (the layout's own, or
the random one) takes fold ``-1``: a held-out test that no fold trains or validates on.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd
from annotated_types import Ge
from sklearn.model_selection import StratifiedGroupKFold

from .options import STRICT
from .shards import ShardedImages

HELD_OUT = -1  # the fold of the split's validation side


def fold_name(k: int) -> str:
    """Fold ``k``'s name: its view's, its Kedro namespace's, its MLflow run's."""
    return f"fold_{k}"


def fold_number(name: str | None) -> int | None:
    """``k`` for a name ``fold_name(k)`` gave, or for a namespace under it (``fold_2.frozen``);
    None for any other name."""
    match = re.fullmatch(r"fold_(\d+)", (name or "").split(".")[0])
    return int(match.group(1)) if match else None


class FoldError(ValueError):
    """The training side cannot be cut into the folds asked for; the message says what to do."""


@dataclass(frozen=True)
class FoldOptions:
    """How to cut the training side into folds."""

    __pydantic_config__ = STRICT

    folds: Annotated[int, Ge(2)] = 5  # the Kaggle habit for Cassava: 5
    seed: int = 42


def assign_folds(
    manifest: pd.DataFrame, classes: list[str], options: FoldOptions
) -> tuple[pd.DataFrame, list[str]]:
    """``manifest`` (a split manifest: path, label, hash, is_valid) with a ``fold`` column, and
    the warnings the cut earns (a class with fewer training groups than folds is missing from
    some folds' validation sides).

    Raises :class:`FoldError` when a class has fewer than two training groups (a fold would
    train without it) or the training side has fewer groups than folds.
    """
    df = manifest.reset_index(drop=True).copy()
    train = np.flatnonzero(~df["is_valid"].to_numpy(dtype=bool))
    groups = pd.factorize(df["hash"].to_numpy()[train])[0]
    labels = df["label"].to_numpy()[train]
    per_class = pd.Series(groups).groupby(labels).nunique()
    if groups.size == 0 or groups.max() + 1 < options.folds:
        raise FoldError(
            f"cv.folds is {options.folds}, but the training side has "
            f"{0 if groups.size == 0 else groups.max() + 1} distinct image(s); lower cv.folds."
        )
    scarce = [f"{classes[c]} ({n})" for c, n in per_class.items() if n < 2]
    if scarce:
        raise FoldError(
            f"Class(es) with fewer than two distinct training images: {', '.join(scarce)}. "
            "A fold would train without them; add images of them or leave them out of the data."
        )
    notes = []
    few = [f"{classes[c]} ({n})" for c, n in per_class.items() if n < options.folds]
    if few:
        notes.append(
            f"class(es) with fewer distinct training images than cv.folds={options.folds}: "
            f"{', '.join(few)}; some folds validate without them (every fold trains on them)."
        )
    cut = StratifiedGroupKFold(n_splits=options.folds, shuffle=True, random_state=options.seed)
    fold = np.full(len(df), HELD_OUT, dtype=np.int64)
    with warnings.catch_warnings():  # said above, in words a user can act on
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, valid) in enumerate(cut.split(train, labels, groups)):
            fold[train[valid]] = k
    df["fold"] = fold
    return df, notes


def fold_report(folded: pd.DataFrame, classes: list[str]) -> dict:
    """Images per fold and class (fold -1: the held-out test side)."""
    counts = pd.crosstab(folded["fold"], folded["label"]).reindex(
        columns=range(len(classes)), fill_value=0
    )
    return {
        "folds": int(folded["fold"].max()) + 1,
        "held_out": int((folded["fold"] == HELD_OUT).sum()),
        "per_fold": {
            int(f): {classes[c]: int(n) for c, n in row.items()} for f, row in counts.iterrows()
        },
    }


def fold_view(shards: ShardedImages, folded: pd.DataFrame, fold: int) -> ShardedImages:
    """The images of the folds (not the held-out side) of ``shards``, fold ``fold`` as the
    validation side: a view over the same shard files, nothing copied."""
    by_path = folded.set_index("path")["fold"]
    paths = shards.index["path"]
    missing = ~paths.isin(by_path.index)
    if missing.any():
        raise FoldError(
            f"{int(missing.sum())} presized image(s) have no fold (e.g. {paths[missing].iat[0]}): "
            "the folds were cut from another split; run the cv_folds node again."
        )
    assigned = by_path.loc[paths].to_numpy()
    if not 0 <= fold < int(assigned.max()) + 1:
        raise FoldError(f"fold {fold} does not exist: the folds are 0 to {int(assigned.max())}")
    inside = np.flatnonzero(assigned != HELD_OUT)
    return shards.subset(inside).resplit(assigned[inside] == fold, name=fold_name(fold))
