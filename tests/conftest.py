"""Shared fixtures: tiny generated data sets in the layouts the pipeline reads."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.images import write_jpeg


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    """A tiny Kaggle-layout data set: 3 classes x 6 images, 40x30 JPEGs."""
    root = tmp_path / "kaggle"
    rows = []
    for label in range(3):
        for j in range(6):
            image_id = f"{label}{j:03d}.jpg"
            write_jpeg(root / "train_images" / image_id, seed=label * 100 + j)
            rows.append((image_id, label))
    pd.DataFrame(rows, columns=["image_id", "label"]).to_csv(root / "train.csv", index=False)
    (root / "label_num_to_disease_map.json").write_text(
        json.dumps({"0": "alpha", "1": "beta", "2": "gamma"})
    )
    return root
