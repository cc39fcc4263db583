"""TTA blending and metrics, on hand-made predictions and on a tiny trained-from-scratch model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from cassava_pipeline.vision.augment import AugmentOptions
from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.metrics import classification_metrics
from cassava_pipeline.vision.run import model_from_checkpoint
from cassava_pipeline.vision.tta import TtaOptions, blend, tta
from tests.training import initial_checkpoint, tiny_shards


def test_blend_is_fastais_lerp_and_max():
    aug = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]])  # n=2 passes, 1 image, 2 classes
    plain = torch.tensor([[0.9, 0.1]])
    mean = blend(aug, plain, beta=0.25, use_max=False)
    assert torch.allclose(mean, torch.tensor([[0.75 * 0.4 + 0.25 * 0.9, 0.75 * 0.6 + 0.25 * 0.1]]))
    assert torch.allclose(blend(aug, plain, beta=0.25, use_max=True), torch.tensor([[0.9, 0.8]]))
    assert torch.allclose(blend(aug, plain, beta=1.0, use_max=False), plain)


def test_metrics_on_hand_made_predictions_match_sklearn_and_hand_values():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    y = np.array([0, 1, 1, 2])
    m = classification_metrics(probs, y, ["a", "b", "c"])
    assert m["accuracy"] == 0.75 and m["error_rate"] == 0.25 and m["n"] == 4
    assert m["cross_entropy"] == pytest.approx(
        -(math.log(0.7) + math.log(0.8) + math.log(0.3) + math.log(0.6)) / 4
    )
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["per_class"]["a"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
    }
    assert m["per_class"]["b"]["recall"] == 0.5 and m["per_class"]["b"]["precision"] == 1.0
    _, _, f, _ = skm.precision_recall_fscore_support(y, probs.argmax(1))
    assert [m["per_class"][k]["f1"] for k in "abc"] == pytest.approx(list(f))
    # a class never predicted nor present scores 0 rather than failing
    m2 = classification_metrics(probs[:2, :], y[:2], ["a", "b", "c"])
    assert m2["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.zeros((0, 3)), np.zeros(0), ["a", "b", "c"])


def test_balanced_accuracy_is_sklearns_without_its_warning(recwarn):
    """Mean recall over the classes the validation set holds, to the bit, on random predictions
    with every class present and with classes missing from it (predicted or not)."""
    rng = np.random.default_rng(0)
    for trial in range(50):
        n, k = int(rng.integers(1, 40)), int(rng.integers(2, 7))
        probs = rng.random((n, k))
        present = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)
        y = rng.choice(present, size=n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's, for predicted-but-absent classes
            expected = skm.balanced_accuracy_score(y, probs.argmax(1))
        got = classification_metrics(probs, y, [str(i) for i in range(k)])["balanced_accuracy"]
        assert got == expected, trial
    recwarn.clear()
    classification_metrics(np.eye(3)[[0, 1, 2]], np.array([0, 0, 1]), ["a", "b", "c"])
    assert not [w for w in recwarn if "y_true" in str(w.message)]


def test_tta_on_a_model(tmp_path):
    shards = tiny_shards(tmp_path, per_class=6)
    _, valid = shards.split()
    model, stats = model_from_checkpoint(initial_checkpoint())
    aug = AugmentOptions(size=32, min_scale=0.75)
    loader = LoaderOptions(batch_size=4, num_workers=0)
    out = tta(model, valid, stats, aug, loader, TtaOptions(n=3))
    n = len(valid)
    assert out["plain"].shape == out["tta"].shape == (n, 3) and out["targets"].shape == (n,)
    assert torch.allclose(out["tta"].sum(1), torch.ones(n), atol=1e-5)
    assert out["targets"].tolist() == valid.labels.tolist()
    again = tta(model, valid, stats, aug, loader, TtaOptions(n=3))
    assert torch.equal(out["tta"], again["tta"]) and torch.equal(out["plain"], again["plain"])
    assert not torch.allclose(out["tta"], out["plain"])  # the augmented passes differ
