"""Stratified group k-fold over the training side: one fold per image, duplicates together."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cassava_pipeline.vision.folds import (
    HELD_OUT,
    FoldError,
    FoldOptions,
    assign_folds,
    fold_report,
)

CLASSES = ["a", "b", "c"]


def manifest(n: int = 120, seed: int = 0, dup_every: int = 10) -> pd.DataFrame:
    """Labels 60/30/10%, a fifth held out, and every ``dup_every``-th image a byte copy of the
    one before it (same hash and label)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    hashes = [f"h{i}" for i in range(n)]
    for i in range(dup_every, n, dup_every):
        hashes[i], labels[i] = hashes[i - 1], labels[i - 1]
    return pd.DataFrame(
        {
            "path": [f"img_{i}.jpg" for i in range(n)],
            "label": labels,
            "hash": hashes,
            "is_valid": rng.random(n) < 0.2,
        }
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_each_training_image_gets_one_fold_and_duplicates_share_it(seed):
    m = manifest(seed=seed)
    folded, notes = assign_folds(m, CLASSES, FoldOptions(folds=4, seed=seed))
    assert notes == []
    assert list(folded["path"]) == list(m["path"])
    held = folded["is_valid"].to_numpy()
    assert (folded.loc[held, "fold"] == HELD_OUT).all()
    assert set(folded.loc[~held, "fold"]) == {0, 1, 2, 3}
    train = folded[~held]
    assert train.groupby("hash")["fold"].nunique().max() == 1  # copies in one fold
    # stratified: each fold's share of the majority class within 0.15 of the whole's
    share = (train["label"] == 0).mean()
    per_fold = train.groupby("fold")["label"].apply(lambda s: (s == 0).mean())
    assert (per_fold - share).abs().max() < 0.15, per_fold
    sizes = train["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 0.25 * len(train) / 4 + 2


def test_the_cut_is_a_function_of_the_seed():
    m = manifest()
    a, _ = assign_folds(m, CLASSES, FoldOptions(folds=5, seed=7))
    b, _ = assign_folds(m, CLASSES, FoldOptions(folds=5, seed=7))
    c, _ = assign_folds(m, CLASSES, FoldOptions(folds=5, seed=8))
    assert a["fold"].tolist() == b["fold"].tolist()
    assert a["fold"].tolist() != c["fold"].tolist()


def test_a_scarce_class_is_named_and_a_rare_one_noted():
    m = manifest(dup_every=1000)  # no copies: every image distinct
    rare = m.index[(m["label"] == 2) & ~m["is_valid"]]
    m = m.drop(rare[3:])  # three training images of class c
    folded, notes = assign_folds(m, CLASSES, FoldOptions(folds=5))
    assert len(notes) == 1 and "c (3)" in notes[0] and "cv.folds=5" in notes[0]
    assert (folded.loc[folded["label"] == 2, "fold"] != HELD_OUT).sum() == 3
    m = m.drop(rare[1:3])  # one left
    with pytest.raises(FoldError, match=r"c \(1\)"):
        assign_folds(m, CLASSES, FoldOptions(folds=5))
    with pytest.raises(FoldError, match=r"lower cv\.folds"):
        assign_folds(manifest(n=12, dup_every=100), CLASSES, FoldOptions(folds=20))


def test_the_report_counts_images_per_fold_and_class():
    folded, _ = assign_folds(manifest(), CLASSES, FoldOptions(folds=3))
    report = fold_report(folded, CLASSES)
    assert report["folds"] == 3 and report["held_out"] == int(folded["is_valid"].sum())
    total = sum(sum(row.values()) for f, row in report["per_fold"].items() if f != HELD_OUT)
    assert total == int((~folded["is_valid"]).sum())


def test_a_fold_view_validates_on_its_fold_and_never_sees_the_held_out_side(tmp_path):
    from cassava_pipeline.vision.folds import fold_view
    from cassava_pipeline.vision.provenance import shards_difference
    from tests.training import CLASSES as COLOURS
    from tests.training import tiny_shards

    shards = tiny_shards(tmp_path)
    table = shards.index
    folded, _ = assign_folds(table, list(COLOURS), FoldOptions(folds=3, seed=1))
    held = set(folded.loc[folded["fold"] == HELD_OUT, "path"])
    seen_valid: list[str] = []
    contents = []
    for k in range(3):
        view = fold_view(shards, folded, k)
        train, valid = view.split()
        assert set(train.index["path"]) | set(valid.index["path"]) == set(table["path"]) - held
        assert set(valid.index["path"]) == set(folded.loc[folded["fold"] == k, "path"])
        assert not set(train.index["path"]) & set(valid.index["path"])
        assert valid.index["is_valid"].all() and not train.index["is_valid"].any()
        seen_valid += valid.index["path"].tolist()
        contents.append(view.content)
        assert train.content == view.content  # what a stage records as trained_on
        image, label = valid[0]
        assert image.dtype == np.uint8 and label == valid.labels[0]
    assert sorted(seen_valid) == sorted(set(table["path"]) - held)  # each image validated once
    # the folds differ only in their split; the shards' own split is another again
    assert shards_difference(contents[0], contents[1]) == "split changed"
    assert shards_difference(contents[0], shards.content) == "split changed"
    assert shards_difference(contents[2], fold_view(shards, folded, 2).content) is None
    with pytest.raises(FoldError, match="fold 3 does not exist"):
        fold_view(shards, folded, 3)
    with pytest.raises(FoldError, match="have no fold"):
        fold_view(shards, folded.iloc[1:], 0)
