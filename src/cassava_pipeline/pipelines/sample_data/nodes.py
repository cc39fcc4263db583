"""Nodes of the sample_data pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
from PIL import Image

from cassava_pipeline.vision.sample import SampleOptions, label_map, lazy_images, sample_table


def generate_sample(
    params: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, str], dict[str, Callable[[], Image.Image]]]:
    """Kaggle's train.csv, label map and lazily drawn train_images/ for the synthetic sample."""
    fractions = params.get("class_fractions")
    options = SampleOptions(
        **{k: v for k, v in params.items() if k not in ("class_fractions", "workers")},
        **({"class_fractions": tuple(fractions)} if fractions else {}),
    )
    table = sample_table(options)
    images = lazy_images(table, options, workers=int(params.get("workers", 0)))
    return table, label_map(len(options.class_fractions)), images
