"""The synthetic sample: Kaggle's class mix, deterministic drawing, visible differences."""

from __future__ import annotations

import numpy as np

from cassava_pipeline.vision.sample import (
    CASSAVA_CLASSES,
    CBB,
    CMD,
    HEALTHY,
    KAGGLE_CLASS_FRACTIONS,
    SampleOptions,
    _draw_leaf,
    class_counts,
    draw_image,
    label_map,
    sample_table,
)


def test_class_counts_follow_kaggle():
    counts = class_counts(400, KAGGLE_CLASS_FRACTIONS)
    assert sum(counts) == 400
    assert counts == [20, 41, 45, 246, 48]
    assert class_counts(5, KAGGLE_CLASS_FRACTIONS) == [1, 1, 1, 1, 1]


def test_table_is_kaggle_shaped_and_deterministic():
    a = sample_table(SampleOptions(n_images=50, seed=1))
    b = sample_table(SampleOptions(n_images=50, seed=1))
    assert a.equals(b) and list(a.columns) == ["image_id", "label"]
    assert a["image_id"].str.fullmatch(r"\d+\.jpg").all() and a["image_id"].is_unique
    assert label_map()["3"] == "Cassava Mosaic Disease (CMD)" and len(CASSAVA_CLASSES) == 5


def test_drawing_is_deterministic_and_sized():
    opts = SampleOptions(width=160, height=120)
    a = np.asarray(draw_image(CMD, np.random.default_rng(7), opts))
    b = np.asarray(draw_image(CMD, np.random.default_rng(7), opts))
    assert a.shape == (120, 160, 3) and np.array_equal(a, b)


def _yellow_fraction(label: int, n: int = 6) -> float:
    opts = SampleOptions(width=200, height=150)
    fr = []
    for i in range(n):
        img = np.asarray(draw_image(label, np.random.default_rng([3, label, i]), opts)).astype(int)
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        fr.append(((r > 150) & (g > 150) & (b < 110)).mean())  # yellow-green mosaic pixels
    return float(np.mean(fr))


def test_mosaic_is_yellower_than_healthy():
    # The classes must differ the way the diseases look: CMD shows yellow-green mosaic.
    assert _yellow_fraction(CMD) > 3 * _yellow_fraction(HEALTHY) + 0.002


def test_blight_lesions_are_brown_on_the_leaf():
    def brown(label):
        fr = []
        for i in range(4):
            leaf = np.asarray(_draw_leaf(np.random.default_rng(i), label, 0.8)).astype(int)
            r, g, b, a = (leaf[..., k] for k in range(4))
            on_leaf = a > 200
            fr.append(((r > g) & (r - b > 40) & on_leaf).sum() / on_leaf.sum())
        return float(np.mean(fr))

    assert brown(CBB) > 0.02 > brown(HEALTHY)
