"""ClassificationInterpretation: confusion matrix, most_confused, top losses, report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cassava_pipeline.vision.interpret import (
    classification_report,
    confusion_matrix,
    most_confused,
    top_losses,
)

CLASSES = ["CBB", "CMD", "Healthy"]
# 6 images: actual 0,0,1,1,1,2; predicted 0,1,1,1,0,1
PROBS = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.7, 0.2],
        [0.2, 0.5, 0.3],
        [0.9, 0.05, 0.05],
        [0.1, 0.65, 0.25],
    ]
)
TARGETS = np.array([0, 0, 1, 1, 1, 2])


def test_confusion_matrix_counts_and_rows():
    cm = confusion_matrix(PROBS, TARGETS, 3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 1, 0]]
    norm = confusion_matrix(PROBS, TARGETS, 3, normalize=True)
    assert norm[1].tolist() == pytest.approx([1 / 3, 2 / 3, 0])
    assert norm.sum(1).tolist() == pytest.approx([1, 1, 1])


def test_most_confused_counts_and_min_val():
    assert most_confused(PROBS, TARGETS, CLASSES) == [
        ("CBB", "CMD", 1),
        ("CMD", "CBB", 1),
        ("Healthy", "CMD", 1),
    ]
    assert most_confused(PROBS, TARGETS, CLASSES, min_val=2) == []
    many = np.concatenate([PROBS, PROBS[[4]]])
    assert most_confused(many, np.append(TARGETS, 1), CLASSES)[0] == ("CMD", "CBB", 2)


def test_top_losses_order_and_fields():
    top = top_losses(PROBS, TARGETS, k=3)
    # losses: -log p[actual]: image 4 has p=0.05 for CMD, the largest loss
    assert [t["index"] for t in top] == [4, 5, 1]
    assert top[0]["loss"] == pytest.approx(-math.log(0.05))
    assert (top[0]["predicted"], top[0]["actual"], top[0]["probability"]) == (0, 1, 0.9)
    all_losses = [t["loss"] for t in top_losses(PROBS, TARGETS)]
    assert all_losses == sorted(all_losses, reverse=True) and len(all_losses) == 6


def test_classification_report_names_every_class():
    report = classification_report(PROBS, TARGETS, CLASSES)
    assert report["CMD"]["recall"] == pytest.approx(2 / 3)
    assert report["Healthy"]["support"] == 1 and report["Healthy"]["precision"] == 0
    assert "macro avg" in report and report["accuracy"] == pytest.approx(0.5)


def test_show_batch_is_a_shuffled_batch_not_the_first_class(tmp_path):
    """The shards hold the images class after class; show_batch draws epoch 0's shuffled order,
    as fastai's training DataLoader does, so one figure shows several classes."""
    from cassava_pipeline.vision.data import EpochSampler
    from cassava_pipeline.vision.plots import augmented_batch
    from tests.training import AUG, tiny_shards

    train, _ = tiny_shards(tmp_path).split()
    assert len(set(train.labels[:9].tolist())) == 1  # the manifest's order: one class first
    stats = type("Stats", (), {"mean": (0.5,) * 3, "std": (0.5,) * 3})()
    images, labels = augmented_batch(train, AUG, stats, 9, seed=3)
    order = EpochSampler(len(train), shuffle=True, seed=3).indices()[:9]
    assert labels == train.labels[order].tolist()
    assert len(set(labels)) > 1 and len(images) == 9 and images[0].shape == (32, 32, 3)
