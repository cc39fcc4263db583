"""Split: stratified, seeded, duplicates together, the layout's own split, class checks."""

from __future__ import annotations

import pandas as pd
import pytest

from cassava_pipeline.vision.split import SplitError, SplitOptions, check_classes, split


def manifest(labels: list[int], hashes: list[str] | None = None, is_valid=None) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame(
        {
            "path": [f"img/{i}.jpg" for i in range(n)],
            "label": labels,
            "label_name": [f"c{lab}" for lab in labels],
            "is_valid": pd.array(is_valid if is_valid is not None else [None] * n, dtype="boolean"),
            "width": 10,
            "height": 10,
            "hash": hashes or [f"h{i}" for i in range(n)],
        }
    )


CLASSES = ["c0", "c1", "c2"]


def test_stratified_counts_per_class():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    df, report = split(manifest(labels), CLASSES, SplitOptions(valid_pct=0.2, seed=1))
    assert [(c["train"], c["valid"]) for c in report["classes"]] == [(40, 10), (24, 6), (16, 4)]
    assert report["n_valid"] == 20 and report["method"] == "stratified_random"
    assert df["is_valid"].dtype == bool


def test_seed_reproducible_and_seed_dependent():
    m = manifest([0] * 50 + [1] * 50)
    a, _ = split(m, CLASSES[:2], SplitOptions(seed=3))
    b, _ = split(m, CLASSES[:2], SplitOptions(seed=3))
    c, _ = split(m, CLASSES[:2], SplitOptions(seed=4))
    assert a["is_valid"].tolist() == b["is_valid"].tolist() != c["is_valid"].tolist()


def test_duplicates_land_on_the_same_side():
    labels = [0] * 40 + [1] * 40
    hashes = [f"h{i // 4}" for i in range(80)]  # groups of 4 byte-identical files
    for seed in range(5):
        df, report = split(manifest(labels, hashes), CLASSES[:2], SplitOptions(seed=seed))
        sides = df.groupby("hash")["is_valid"].nunique()
        assert (sides == 1).all()
        assert report["duplicate_groups"] == 20
        assert report["n_valid"] == 16  # 20% of 80, in whole groups


def test_layout_split_is_kept_and_duplicates_moved_to_train():
    labels = [0, 0, 1, 1, 0, 1]
    hashes = ["a", "b", "c", "d", "a", "e"]  # 'a' is on both sides
    is_valid = [False, False, False, False, True, True]
    df, report = split(manifest(labels, hashes, is_valid), CLASSES[:2], SplitOptions())
    assert report["method"] == "layout"
    assert df["is_valid"].tolist() == [False, False, False, False, False, True]
    assert report["duplicates_moved_to_train"] == 1


def test_class_without_training_image_is_an_error_naming_it():
    labels = [0, 0, 0, 1]
    is_valid = [False, False, True, True]
    with pytest.raises(SplitError, match=r"\['c1'\]"):
        split(manifest(labels, None, is_valid), CLASSES[:2], SplitOptions())


def test_single_image_class_stays_in_training():
    _, report = split(manifest([0] * 10 + [1]), CLASSES[:2], SplitOptions(valid_pct=0.5))
    assert report["classes"][1] == {"index": 1, "name": "c1", "train": 1, "valid": 0}


def test_conflicting_labels_on_identical_files_are_left_out_unless_kept():
    """The same bytes under two labels: one label is wrong and nobody can tell which, so both
    copies leave the data by default; keep_conflicting_duplicates keeps them (one side)."""
    m = manifest([0, 1, 0, 1, 0, 1], ["x", "x", "y", "z", "x", "w"])
    out, report = split(m, CLASSES[:2], SplitOptions())
    assert report["duplicates_with_conflicting_labels"] == [["img/0.jpg", "img/1.jpg", "img/4.jpg"]]
    assert report["conflicting_duplicates_excluded"] == ["img/0.jpg", "img/1.jpg", "img/4.jpg"]
    assert sorted(out["path"]) == ["img/2.jpg", "img/3.jpg", "img/5.jpg"]
    assert report["n_train"] + report["n_valid"] == 3

    kept, report = split(m, CLASSES[:2], SplitOptions(keep_conflicting_duplicates=True))
    assert len(kept) == 6 and report["conflicting_duplicates_excluded"] == []
    copies = kept[kept["hash"] == "x"]["is_valid"]
    assert copies.nunique() == 1  # still on one side together


def test_bad_valid_pct():
    with pytest.raises(SplitError, match="valid_pct"):
        split(manifest([0, 1]), CLASSES[:2], SplitOptions(valid_pct=1.0))


@pytest.mark.parametrize(
    ("labels", "classes", "found"),
    [([0] * 12, CLASSES, "only 'c0'"), ([], CLASSES, "none"), ([0] * 12, ["c0"], "only 'c0'")],
)
def test_fewer_than_two_classes_stop_before_training(labels, classes, found):
    # A label map that lists more classes than have images: split itself says so; a folder
    # with one class splits, and check_classes (the node's next step) stops the run.
    message = r"images of \d class\(es\) \(" + found + r"\); a classifier needs at least two"
    with pytest.raises(SplitError, match=message):
        _, report = split(manifest(labels), classes, SplitOptions())
        check_classes(report)


def test_weak_classes_are_named_in_warnings():
    labels = [0] * 40 + [1] * 3 + [2] * 30
    _, report = split(manifest(labels), CLASSES, SplitOptions(valid_pct=0.2, seed=0))
    by_name = {c["name"]: c for c in report["classes"]}
    assert by_name["c1"]["valid"] == 1 and by_name["c1"]["train"] == 2
    assert report["warnings"] == [
        "class(es) with fewer than 5 training images: c1 (2). The model will hardly learn "
        "them; add images, or merge or drop the class."
    ]
    _, report = split(manifest([0] * 40 + [1] * 2), CLASSES[:2], SplitOptions(valid_pct=0.2))
    assert report["warnings"] == [
        "class(es) ['c1'] have no validation image: their accuracy, recall and confusion rows "
        "are not measured. Add images of them, or raise split.valid_pct.",
        "class(es) with fewer than 5 training images: c1 (2). The model will hardly learn "
        "them; add images, or merge or drop the class.",
    ]


def test_a_healthy_split_warns_of_nothing():
    _, report = split(manifest([0] * 50 + [1] * 30 + [2] * 20), CLASSES, SplitOptions())
    assert report["warnings"] == []
    check_classes(report)  # two classes or more: no error
