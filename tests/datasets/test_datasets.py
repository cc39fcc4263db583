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


# ---- kedro-datasets' file datasets, written atomically --------------------------------------


def test_atomic_json_replaces_whole_or_not_at_all(tmp_path: Path):
    from cassava_pipeline.datasets.atomic import JSONDataset

    path = tmp_path / "reports" / "metrics.json"
    ds = JSONDataset(filepath=str(path), save_args={"indent": 2})
    ds.save({"accuracy": 0.5})
    assert ds.load() == {"accuracy": 0.5}
    with pytest.raises(DatasetError, match="not JSON serializable"):
        ds.save({"accuracy": 0.75, "broken": object()})  # fails half-way through json.dump
    assert ds.load() == {"accuracy": 0.5}  # the previous file is untouched, not half-written
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temporary


def test_atomic_writes_keep_the_format_and_sweep_dead_writers(tmp_path: Path):
    import pandas as pd
    from PIL import Image

    from cassava_pipeline.datasets.atomic import CSVDataset, ImageDataset
    from cassava_pipeline.vision.atomic import remove_dead_temps_under

    dead = 2**22 + 12345  # above any pid this box hands out (pid_max is 2**22)
    leftover = tmp_path / f".table.csv.tmp-{dead}.csv"  # a writer killed mid-write
    leftover.write_text("a,b\n1,")
    image = ImageDataset(filepath=str(tmp_path / "one.png"))
    image.save(Image.new("RGB", (6, 4), (10, 200, 30)))  # Pillow picks PNG from the suffix
    with Image.open(tmp_path / "one.png") as im:
        assert im.format == "PNG" and im.getpixel((5, 3)) == (10, 200, 30)
    table = CSVDataset(filepath=str(tmp_path / "table.csv"), save_args={"index": False})
    table.save(pd.DataFrame({"a": [1, 2], "b": [3, 4]}))
    assert table.load()["b"].tolist() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "table.csv"]

    other = tmp_path / "deep" / f".metrics.json.tmp-{dead}.json"
    other.parent.mkdir()
    other.write_text("{")
    assert remove_dead_temps_under(tmp_path) == [Path("deep") / other.name]
