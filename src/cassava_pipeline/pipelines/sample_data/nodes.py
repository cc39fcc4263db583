"""Nodes of the sample_data pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pandas as pd
from PIL import Image

from cassava_pipeline.validation import parse
from cassava_pipeline.vision.sample import (
    SampleOptions,
    label_map,
    lazy_images,
    sample_table,
    test_table,
)

LazyImages = dict[str, Callable[[], Image.Image]]


def generate_sample(
    params: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, str], LazyImages, pd.DataFrame, LazyImages]:
    """Kaggle's layout for the synthetic sample: train.csv, the label map, train_images/, and
    sample_submission.csv with its unlabeled test_images/ (for ``cassava_predict``)."""
    options = parse(SampleOptions, params)
    table = sample_table(options)
    images = lazy_images(table, options, workers=options.workers)
    test = test_table(options, options.n_test_images)
    test_images = lazy_images(
        test, replace(options, seed=options.seed + 1), workers=options.workers
    )
    # Kaggle's sample_submission.csv: every test image with the majority label as a placeholder.
    submission = pd.DataFrame({"image_id": test["image_id"], "label": 3})
    return table, label_map(len(options.class_fractions)), images, submission, test_images
