"""No damaged file is ever used: checkpoints, resume files, the exported model and shards are
verified against the digest written with them; errors name the file and the next step."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DatasetError

from cassava_pipeline.datasets import CheckpointDataset, ExportedModelDataset
from cassava_pipeline.vision import integrity
from cassava_pipeline.vision import shards as shards_module
from cassava_pipeline.vision.export import ExportError
from cassava_pipeline.vision.integrity import IntegrityError
from cassava_pipeline.vision.learner import RuntimeConfig
from cassava_pipeline.vision.predict import Classifier
from cassava_pipeline.vision.run import train_in_fabric
from cassava_pipeline.vision.shards import ShardedImages
from tests.training import (
    exported,
    history_frame,
    initial_checkpoint,
    interrupted_fit,
    stage,
    tiny_shards,
)

CPU = RuntimeConfig(accelerator="cpu", progress=False)
MARK = torch.full((4096,), 7.25)  # a tensor whose bytes are easy to find in a file


def flip(path: Path, offset: int, n: int) -> None:
    """Invert ``n`` bytes of ``path`` from ``offset`` on, as a failing disk or copy would."""
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def mark_offset(path: Path) -> int:
    return path.read_bytes().index(struct.pack("<f", 7.25) * 64)


def refused(load, kind=IntegrityError) -> str:
    """The message of the error ``load()`` raises: ours, or ours inside Kedro's DatasetError."""
    with pytest.raises((kind, DatasetError)) as e:
        load()
    text = str(e.value)
    if isinstance(e.value, DatasetError):
        assert isinstance(e.value.__cause__ or e.value.__context__, kind), repr(e.value)
    return text


def no_torch_advice(text: str) -> None:
    assert "weights_only=False" not in text and "weights_only" not in text


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("tiny"))


def test_a_checkpoint_with_flipped_bytes_is_refused(tmp_path: Path):
    path = tmp_path / "frozen.pt"
    ds = CheckpointDataset(path=str(path))
    ds.save({"model": {"w": MARK.clone()}, "classes": ["a", "b"], "best_metric": 0.5})
    assert ds.load()["classes"] == ["a", "b"]
    flip(path, mark_offset(path) + 100, 64)
    text = refused(ds.load)
    assert str(path) in text and "does not match its sha256" in text
    assert "kedro run --pipelines=train" in text  # what to do
    no_torch_advice(text)


def test_a_truncated_or_foreign_checkpoint_names_the_file(tmp_path: Path):
    path = tmp_path / "mixup.pt"
    ds = CheckpointDataset(path=str(path))
    ds.save({"model": {"w": MARK.clone()}})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    text = refused(ds.load)
    assert f"{path}: it is truncated or not a torch file" in text
    torch.save({"model": {}, "payload": _Payload()}, path)
    text = refused(ds.load)
    assert f"{path}: it holds pickled objects" in text and "kedro run --pipelines=train" in text
    no_torch_advice(text)
    torch.save({"model": {"w": MARK}}, path)  # a plain torch.save: no digest to verify
    assert "no sha256" in refused(ds.load)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_damaged_resume_file_is_set_aside_and_the_stage_resumes_from_the_epoch_before(
    shards, tmp_path: Path, caplog
):
    full = train_in_fabric(initial_checkpoint(), shards, stage(epochs=3), CPU)
    interrupted_fit(shards, stage(epochs=3), tmp_path, epochs=2)
    last = tmp_path / "last.pt"
    assert torch.load(tmp_path / "prev.pt", weights_only=True)["epoch"] == 1
    flip(last, last.stat().st_size // 2, 64)  # somewhere in the weights or optimizer state
    caplog.set_level("INFO", logger="cassava_pipeline")
    resumed = train_in_fabric(
        initial_checkpoint(), shards, stage(epochs=3), CPU, checkpoint_dir=tmp_path
    )
    assert f"{last} is damaged" in caplog.text and "set aside as last.pt.corrupt" in caplog.text
    assert "prev.pt holds this run after epoch 1: resuming" in caplog.text
    assert (tmp_path / "last.pt.corrupt").is_file()
    for k, v in full.state_dict.items():  # retrained epochs 2 and 3: the same weights
        assert torch.equal(v, resumed.state_dict[k]), k
    pd.testing.assert_frame_equal(history_frame(full.history), history_frame(resumed.history))


@pytest.mark.parametrize("where", ["weights", "header"])
def test_a_damaged_model_file_is_never_loaded(tmp_path: Path, test_images: Path, where):
    path = tmp_path / "model.safetensors"
    ExportedModelDataset(path=str(path)).save(exported())
    before = Classifier.load(path).predict([test_images / "0.jpg"]).probabilities
    assert before.shape == (1, 3)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    offset = 8 + header_len + 4096 if where == "weights" else 8 + header_len // 2
    flip(path, offset, 256 if where == "weights" else 8)
    for load in (lambda: Classifier.load(path), ExportedModelDataset(path=str(path)).load):
        text = refused(load, ExportError)
        assert str(path) in text and "export it again" in text


def test_damaged_or_truncated_shards_are_never_read(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(shards_module, "_VERIFIED", set())  # as in a fresh process
    ds = tiny_shards(tmp_path / "a", per_class=20)
    shard = ds.directory / ds.meta["shards"][0]["file"]
    original = shard.read_bytes()
    assert len(original) > 200_000
    flip(shard, 0, 200_000)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    with pytest.raises(IntegrityError) as e:
        ShardedImages(ds.directory)
    assert str(shard) in str(e.value) and "does not match its sha256" in str(e.value)
    assert "kedro run --pipelines=data" in str(e.value)
    shard.write_bytes(original[:-1000])  # truncated
    with pytest.raises(IntegrityError, match=r"holds \d+ bytes, \d+ were written"):
        ShardedImages(ds.directory)
    shard.write_bytes(original)
    assert len(ShardedImages(ds.directory)) == 60  # intact again
    meta_path = ds.directory / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["size"] = 44  # an edit that keeps the JSON valid
    meta_path.write_text(json.dumps(meta))
    assert "meta.json: its content does not match" in refused(lambda: ShardedImages(ds.directory))


def test_shards_are_hashed_once_per_process(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(shards_module, "_VERIFIED", set())
    ds = tiny_shards(tmp_path / "a")
    calls = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(shards_module, "_VERIFIED", set())
    for _ in range(3):
        images = ShardedImages(ds.directory)
    assert len(calls) == 1 + len(images.meta["shards"])  # the index and each shard, once
    assert np.asarray(images[0][0]).shape[2] == 3
