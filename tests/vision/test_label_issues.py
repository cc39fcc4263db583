"""cleanlab's label issues from out-of-fold probabilities: planted flips come out on top."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cassava_pipeline.vision.label_issues import ISSUE_COLUMNS, label_issues

CLASSES = ["cbb", "cbsd", "cgm", "cmd", "healthy"]


def oof(n: int, flips: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold probabilities of a decent model (about 90% right) on ``n`` images, and the
    given labels with ``flips`` of them changed to another class (the model still sees the true
    class)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(5, size=n, p=[0.05, 0.1, 0.1, 0.6, 0.15])
    logits = rng.normal(0, 1, size=(n, 5))
    logits[np.arange(n), truth] += 3.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = truth.copy()
    flipped = rng.choice(n, size=flips, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, 5, size=flips)) % 5
    return [f"{i}.jpg" for i in range(n)], given, probs, flipped


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_planted_flips_rank_among_the_top_suspects(seed):
    images, given, probs, flipped = oof(500, 25, seed)
    issues = label_issues(images, given, probs, CLASSES)
    assert list(issues.columns) == list(ISSUE_COLUMNS)
    assert issues["rank"].tolist() == list(range(1, len(issues) + 1))
    assert issues["self_confidence"].is_monotonic_increasing  # most suspect first
    top = set(issues["image"].head(50))
    found = len(top & {images[i] for i in flipped})
    # of 25 flips, in the top 50: 16 to 23 over seeds 0-29 (the rest look like their new class
    # to the model too)
    assert found >= 13, found
    row = issues.set_index("image").loc[images[flipped[0]]] if images[flipped[0]] in top else None
    if row is not None:
        assert row["given_label"] == CLASSES[given[flipped[0]]]
        assert row["suggested_label"] == CLASSES[int(probs[flipped[0]].argmax())]


def test_clean_labels_from_a_confident_model_raise_few_suspects():
    images, given, probs, _ = oof(400, 0, 7)
    sharp = probs**4 / (probs**4).sum(1, keepdims=True)
    assert len(label_issues(images, given, sharp, CLASSES)) < 0.05 * 400


def test_shapes_that_do_not_fit_are_named():
    images, given, probs, _ = oof(20, 0, 0)
    with pytest.raises(ValueError, match="do not fit"):
        label_issues(images, given, probs[:, :4], CLASSES)
    empty = label_issues([], np.array([], dtype=int), np.zeros((0, 5)), CLASSES)
    assert isinstance(empty, pd.DataFrame) and empty.empty


def test_a_revision_keeps_drops_or_relabels_the_suspects_only(tmp_path):
    from cassava_pipeline.vision.folds import FoldOptions, assign_folds
    from cassava_pipeline.vision.label_issues import revise_labels, revised_view
    from cassava_pipeline.vision.provenance import shards_difference
    from tests.training import CLASSES as COLOURS
    from tests.training import tiny_shards

    shards = tiny_shards(tmp_path)
    colours = list(COLOURS)
    folded, _ = assign_folds(shards.index, colours, FoldOptions(folds=3, seed=1))
    training = folded[folded["fold"] != -1].reset_index(drop=True)
    suspects = training.iloc[[0, 5]]
    issues = pd.DataFrame(
        {
            "image": suspects["path"],
            "given_label": [colours[i] for i in suspects["label"]],
            "suggested_label": [colours[(i + 1) % 3] for i in suspects["label"]],
            "self_confidence": [0.01, 0.02],
            "rank": [1, 2],
        }
    )
    kept = revise_labels(folded, issues, colours, "keep")
    assert (kept["revision"] == "").all() and kept["label"].tolist() == folded["label"].tolist()
    assert kept["is_valid"].tolist() == (folded["fold"] == -1).tolist()

    dropped = revise_labels(folded, issues, colours, "drop")
    assert set(dropped.loc[dropped["revision"] == "dropped", "path"]) == set(suspects["path"])
    view = revised_view(shards, dropped, name="")
    train, valid = view.split()
    assert set(train.index["path"]) == set(training["path"]) - set(suspects["path"])
    assert set(valid.index["path"]) == set(folded.loc[folded["fold"] == -1, "path"])
    assert len(view) == len(shards) - 2

    # a rank cut: the first suspect only, whatever the order of the rows
    first = revise_labels(folded, issues.iloc[::-1], colours, "drop", limit=1)
    assert first.loc[first["revision"] == "dropped", "path"].tolist() == [suspects["path"].iat[0]]
    assert revise_labels(folded, issues, colours, "drop", limit=0)["revision"].eq("").all()
    with pytest.raises(ValueError, match="0 or more"):
        revise_labels(folded, issues, colours, "drop", limit=-1)

    relabelled = revise_labels(folded, issues, colours, "relabel")
    changed = relabelled[relabelled["revision"] == "relabelled"].set_index("path")["label"]
    assert changed.to_dict() == {
        p: (i + 1) % 3 for p, i in zip(suspects["path"], suspects["label"], strict=True)
    }
    view2 = revised_view(shards, relabelled, name="")
    labels = dict(zip(view2.index["path"], view2.labels, strict=True))
    assert all(labels[p] == changed[p] for p in changed.index)  # what the loader yields
    position = view2.index["path"].tolist().index(changed.index[0])
    assert view2[position][1] == changed.iloc[0]
    unchanged = set(shards.index["path"]) - set(changed.index)
    original = dict(zip(shards.index["path"], shards.labels, strict=True))
    assert all(labels[p] == original[p] for p in unchanged)
    # the labels are part of what a model trained on: a relabelled view is not the kept one
    assert shards_difference(view2.content, revised_view(shards, kept, "").content)

    stale = issues.assign(given_label=[colours[(i + 2) % 3] for i in suspects["label"]])
    with pytest.raises(ValueError, match="found on other folds or labels"):
        revise_labels(folded, stale, colours, "drop")
    held = folded.loc[folded["fold"] == -1, "path"].iloc[0]
    with pytest.raises(ValueError, match="not training images"):
        revise_labels(
            folded, issues.assign(image=[held, suspects["path"].iloc[1]]), colours, "drop"
        )


def test_label_issues_start_no_process_pool(monkeypatch):
    """cleanlab forks a multiprocessing pool by default; in a kedro run (torch's and Arrow's
    threads running) a pool worker deadlocked on the pool's queue lock and the run hung in
    out_of_fold. The issues come from this process alone (on the clothing-small benchmark's
    out-of-fold predictions: the same 424 suspects in the same order as with the pool)."""
    import multiprocessing

    def refuse(*args, **kwargs):
        raise AssertionError("label_issues started a process pool")

    monkeypatch.setattr(multiprocessing, "Pool", refuse)
    images, given, probs, flipped = oof(500, 25, 0)
    issues = label_issues(images, given, probs, CLASSES)
    assert set(issues["image"]) & {images[i] for i in flipped}
