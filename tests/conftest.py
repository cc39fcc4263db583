"""Shared fixtures: tiny generated data sets in the layouts the pipeline reads."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.images import gradient_rgb, jpeg_bytes, write_jpeg


def pytest_configure(config):
    """Under ``make test``'s parallel workers (pytest-xdist), one thread per worker and per
    process it starts: two workers of two threads each on two cores spend their time waiting
    for each other (the suite took twice the CPU time so)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def store(tmp_path: Path, monkeypatch):
    """A fresh SQLite tracking store and artifact folder, active for the test only."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("test", artifact_location=(tmp_path / "artifacts").as_uri())
    # the active experiment too: one an earlier test set (kedro-mlflow's, in-process) is not
    # in this store
    mlflow.set_experiment(experiment_id=exp)
    yield uri, exp
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    """A tiny Kaggle-layout data set: 3 classes x 6 images, 40x30 JPEGs."""
    return write_kaggle_dir(tmp_path / "kaggle")


def write_kaggle_dir(root: Path) -> Path:
    """Write the :func:`kaggle_dir` data set into ``root``."""
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


def png_bytes(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def test_images(tmp_path: Path) -> Path:
    """Kaggle's test_images/: JPEGs, an RGBA PNG, a palette PNG and four unusable files."""
    root = tmp_path / "test_images"
    for i in range(3):
        write_jpeg(root / f"{i}.jpg", w=52, h=44, seed=i)
    (root / "rgba.png").write_bytes(png_bytes(gradient_rgb(44, 52, 7), "RGBA"))
    (root / "palette.png").write_bytes(png_bytes(gradient_rgb(60, 40, 8), "P"))
    good = jpeg_bytes(gradient_rgb(52, 44, 9))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20)
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"hidden")
    return root
