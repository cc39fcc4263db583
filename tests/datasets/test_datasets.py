"""The custom Kedro datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.io import DatasetError

from cassava_pipeline.datasets import ImageRootDataset, ImageShardsDataset
from cassava_pipeline.vision.ingest import IngestOptions, ingest
from cassava_pipeline.vision.layouts import CsvLayout
from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions
from cassava_pipeline.vision.split import SplitOptions, split


def test_image_root(tmp_path: Path):
    ds = ImageRootDataset(path=str(tmp_path))
    assert ds.load() == tmp_path.resolve() and ds.exists()
    assert not ImageRootDataset(path=str(tmp_path / "no")).exists()
    with pytest.raises(DatasetError, match="read-only"):
        ds.save(tmp_path)


def _job(root: Path, size: int) -> PresizeJob:
    m, r = ingest(root, CsvLayout(), IngestOptions(workers=1))
    classes = tuple(c["name"] for c in r["classes"])
    m, _ = split(m, list(classes), SplitOptions())
    return PresizeJob(str(root), m, classes, PresizeOptions(size=size, workers=1))


def test_shards_dataset_round_trip_and_replace(kaggle_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    ds = ImageShardsDataset(path=str(out / "presized"))
    assert not ds.exists()
    ds.save(_job(kaggle_dir, 16))
    assert ds.exists() and ds.load().size == 16
    ds.save(_job(kaggle_dir, 12))  # replaces the previous set atomically
    assert ds.load().size == 12
    assert sorted(p.name for p in out.iterdir()) == ["presized"]  # no temporary leftovers


def test_failed_save_leaves_previous_set(kaggle_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    ds = ImageShardsDataset(path=str(out / "presized"))
    ds.save(_job(kaggle_dir, 16))
    bad = _job(kaggle_dir, 12)
    (kaggle_dir / bad.manifest["path"].iat[0]).unlink()
    with pytest.raises(DatasetError):
        ds.save(bad)
    assert ds.load().size == 16
    assert sorted(p.name for p in out.iterdir()) == ["presized"]
