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
    # no temporary leftovers; the 16 px set is kept for reuse (vision/kept.py)
    assert sorted(p.name for p in out.iterdir()) == ["kept", "presized"]


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


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_shards_written_from_the_same_inputs_are_reused(kaggle_dir: Path, tmp_path: Path, caplog):
    """A rerun with nothing changed keeps the shard set (same files, untouched) after verifying
    it; any changed input, or a damaged shard, writes it again, and the log says why."""
    import dataclasses
    import logging

    out = tmp_path / "presized"
    ds = ImageShardsDataset(path=str(out))
    job = _job(kaggle_dir, 16)
    ds.save(job)
    first = _files(out)
    caplog.set_level(logging.INFO, logger="cassava_pipeline.datasets.shards")

    ds.save(_job(kaggle_dir, 16))  # a fresh ingest and split of the same files: equal inputs
    assert _files(out) == first
    assert "(every shard verified); kept as it is" in caplog.text

    relabelled = job.manifest.copy()
    relabelled.loc[0, "label"] = (int(relabelled.loc[0, "label"]) + 1) % len(job.classes)
    resplit = job.manifest.copy()
    resplit["is_valid"] = ~resplit["is_valid"].astype(bool)
    other_quality = dataclasses.replace(job.options, encoding="jpeg")
    for changed, reason in [
        (dataclasses.replace(job, manifest=relabelled), "labels or files changed"),
        (dataclasses.replace(job, manifest=resplit), "the split changed"),
        (dataclasses.replace(job, options=other_quality), "presize settings changed"),
        (dataclasses.replace(job, options=dataclasses.replace(job.options, shard_mb=1)),
         "shard_mb changed"),
    ]:  # fmt: skip
        caplog.clear()
        ds.save(changed)
        assert f"presize 16 into {out}: {reason}" in caplog.text
        assert _files(out) != first
        ds.save(job)  # back: written again (the set on disk was the changed one)
        first = _files(out)

    shard = next(p for p in out.iterdir() if p.name.endswith(".bin"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle of a shard
    shard.write_bytes(bytes(data))
    caplog.clear()
    ds.save(job)
    assert f"{shard.name} failed its check" in caplog.text
    assert min(ds.load()[0][0].shape[:2]) == 16  # written again: it loads (and verifies)


def test_a_second_presize_of_the_same_size_links_the_first(
    kaggle_dir: Path, tmp_path: Path, caplog
):
    """small and large at the same size: the second set is the first's files, linked."""
    import logging

    caplog.set_level(logging.INFO, logger="cassava_pipeline.datasets.shards")
    job = _job(kaggle_dir, 16)
    small = ImageShardsDataset(path=str(tmp_path / "presized_small"))
    large = ImageShardsDataset(path=str(tmp_path / "presized_large"))
    small.save(job)
    large.save(job)
    assert "linking them, not presizing" in caplog.text
    for f in (tmp_path / "presized_small").iterdir():
        twin = tmp_path / "presized_large" / f.name
        assert twin.stat().st_ino == f.stat().st_ino  # the same file, not a copy
    assert large.load().content == small.load().content
    caplog.clear()
    large.save(_job(kaggle_dir, 12))  # another size: presized for real
    assert "linking" not in caplog.text and large.load().size == 12
    assert small.load().size == 16  # the first set is untouched


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


def _failing_on(monkeypatch, call: str, error: int, when=lambda *a: True) -> None:
    """``os.<call>`` (or ``os.fsync`` etc.) raises ``error`` where ``when(args)`` holds: the disk
    filling up, or a folder turning read-only, at that very step of a write."""
    import errno as _errno
    import os

    real = getattr(os, call)

    def fake(*args, **kwargs):
        if when(*args):
            raise OSError(error, os.strerror(error), str(args[0]) if args else None)
        return real(*args, **kwargs)

    assert error in (_errno.ENOSPC, _errno.EROFS)
    monkeypatch.setattr(os, call, fake)


@pytest.mark.parametrize("error", ["ENOSPC", "EROFS"])
@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_full_or_read_only_disk_leaves_every_writer_as_it_was(
    kaggle_dir: Path, tmp_path: Path, monkeypatch, error: str, step: str
):
    """JSON (a kedro-datasets file), a checkpoint (write_atomic, with and without keeping the
    previous file) and a shard folder: each write failing at the given step raises WriteError
    naming the output and what to do; the previous content is untouched and no temporary
    remains."""
    import errno
    import os

    import torch

    from cassava_pipeline.datasets import CheckpointDataset
    from cassava_pipeline.datasets.atomic import JSONDataset
    from cassava_pipeline.vision.atomic import WriteError, write_atomic

    code = getattr(errno, error)
    report = JSONDataset(filepath=str(tmp_path / "reports" / "data_report.json"))
    report.save({"n": 1})
    ckpt = CheckpointDataset(path=str(tmp_path / "models" / "frozen.pt"))
    ckpt.save({"model": {"w": torch.ones(2)}, "stage": "old"})
    kept = tmp_path / "resume" / "last.pt"
    write_atomic(kept, lambda fh: fh.write(b"epoch 1"))
    shards = ImageShardsDataset(path=str(tmp_path / "presized" / "small"))
    shards.save(_job(kaggle_dir, 12))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    new_job = _job(kaggle_dir, 16)

    with monkeypatch.context() as m:
        if step == "fsync":  # the data itself does not fit / cannot be written
            _failing_on(m, "fsync", code)
        else:  # the rename into place fails, after the temporary was written whole
            _failing_on(m, "replace", code, lambda src, dst: ".tmp-" in str(src))
            _failing_on(m, "rename", code, lambda src, dst: ".tmp-" in str(src))
        writes = [
            (report.save, {"n": 2}, "data_report.json"),
            (ckpt.save, {"model": {"w": torch.zeros(2)}, "stage": "new"}, "frozen.pt"),
            (
                lambda d: write_atomic(
                    kept, lambda fh: fh.write(d), keep_previous=kept.with_name("prev.pt")
                ),
                b"epoch 2",
                "last.pt",
            ),
            (shards.save, new_job, "small"),
        ]
        for save, data, name in writes:
            if name == "small" and step == "fsync":
                continue  # shard files are not fsynced one by one; the rename step covers it
            with pytest.raises(Exception) as info:
                save(data)
            cause = info.value
            while not isinstance(cause, WriteError) and cause.__cause__ is not None:
                cause = cause.__cause__
            assert isinstance(cause, WriteError), (name, info.value)
            text = str(cause)
            assert f"Could not write {tmp_path}" in text and name in text
            assert os.strerror(code) in text and "then run again" in text
            assert ("Free space" if error == "ENOSPC" else "writable") in text
            assert "unchanged" in text

    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # every previous output intact, byte for byte
    assert not [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    report.save({"n": 3})  # the disk fixed: the same writers succeed
    assert report.load() == {"n": 3}
    shards.save(new_job)
    assert shards.load().size == 16


def test_switching_a_presize_back_reuses_the_kept_set(
    kaggle_dir: Path, tmp_path: Path, caplog, monkeypatch
):
    """12 -> 16 -> 12: the 12 px set, kept when 16 replaced it, is put back verified and not
    presized again; 16 waits in its place. A damaged kept set is presized again instead."""
    from cassava_pipeline.datasets import shards as shards_module

    out = tmp_path / "05_model_input"
    ds = ImageShardsDataset(path=str(out / "presized_large"))
    ds.save(_job(kaggle_dir, 12))
    first = _files(out / "presized_large")
    ds.save(_job(kaggle_dir, 16))
    assert ds.load().size == 16
    (kept12,) = (out / "kept" / "presized_large").iterdir()
    caplog.set_level("INFO", logger="cassava_pipeline")

    def no_presize(*args, **kwargs):
        raise AssertionError("presized again")

    with monkeypatch.context() as m:
        m.setattr(shards_module, "write_shards", no_presize)
        ds.save(_job(kaggle_dir, 12))
    assert "back in place, not presizing" in caplog.text
    assert ds.load().size == 12 and _files(out / "presized_large") == first
    (kept16,) = (out / "kept" / "presized_large").iterdir()
    assert kept16 != kept12
    assert sorted(p.name for p in out.iterdir()) == ["kept", "presized_large"]  # no temporaries

    # a kept set damaged meanwhile is not used: presized again, with a warning
    shard = next(p for p in kept16.iterdir() if p.name.startswith("shard"))
    shard.write_bytes(b"damaged")
    caplog.clear()
    ds.save(_job(kaggle_dir, 16))
    assert "is not usable" in caplog.text and ds.load().size == 16
