"""The training loop: it learns, it resumes bit for bit, checkpoints are safe to load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from cassava_pipeline.datasets import CheckpointDataset
from cassava_pipeline.vision.learner import HISTORY_COLUMNS, RuntimeConfig
from cassava_pipeline.vision.run import lr_find_in_fabric, model_from_checkpoint, train_in_fabric
from cassava_pipeline.vision.schedule import LrFindOptions
from tests.images import REPO
from tests.training import history_frame, initial_checkpoint, stage, tiny_shards

CPU = RuntimeConfig(accelerator="cpu", progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("tiny"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_training_learns_and_keeps_the_best_epoch(shards):
    result = train_in_fabric(initial_checkpoint(), shards, stage(epochs=4), CPU)
    hist = pd.DataFrame(result.history)
    assert tuple(hist.columns) == HISTORY_COLUMNS
    assert hist["accuracy"].max() >= 0.6  # chance is 1/3 (random init, 27 images, 4 epochs)
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert result.best_epoch == int(hist["accuracy"].idxmax())
    assert result.best_metric == hist["accuracy"].max()
    assert (hist["error_rate"] + hist["accuracy"]).round(9).eq(1).all()


def test_resume_after_interruption_equals_uninterrupted(shards, tmp_path: Path):
    full = train_in_fabric(
        initial_checkpoint(), shards, stage(), CPU, checkpoint_dir=tmp_path / "a"
    )
    from cassava_pipeline.vision.learner import Trainer
    from cassava_pipeline.vision.run import make_fabric

    # First run stops after one epoch, as an interrupted process would.
    fabric = make_fabric(CPU)
    model, stats = model_from_checkpoint(initial_checkpoint())
    train, valid = shards.split()
    Trainer(fabric, model, stats, progress=False).fit(
        train, valid, stage(), checkpoint_dir=tmp_path / "b", stop_after_epochs=1
    )
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = train_in_fabric(
        initial_checkpoint(), shards, stage(), CPU, checkpoint_dir=tmp_path / "b"
    )
    assert_same_weights(full.state_dict, resumed.state_dict)
    pd.testing.assert_frame_equal(history_frame(full.history), history_frame(resumed.history))


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from cassava_pipeline.vision.learner import RuntimeConfig, Trainer
    from cassava_pipeline.vision.run import make_fabric, model_from_checkpoint
    from cassava_pipeline.vision.shards import ShardedImages
    from tests.training import initial_checkpoint, stage
    shards = ShardedImages({shards!r})
    fabric = make_fabric(RuntimeConfig(accelerator="cpu", progress=False))
    model, stats = model_from_checkpoint(initial_checkpoint())
    train, valid = shards.split()
    def die(row):  # after the epoch's checkpoint is on disk
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.{sig})
    Trainer(fabric, model, stats, progress=False).fit(
        train, valid, stage(), checkpoint_dir=Path({ckpt!r}), on_epoch=die
    )
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])  # kill -9, kill, Ctrl-C
def test_killed_stage_resumes_to_the_same_weights(shards, tmp_path: Path, sig):
    full = train_in_fabric(initial_checkpoint(), shards, stage(), CPU)
    script = KILLER.format(
        repo=str(REPO), shards=str(shards.directory), ckpt=str(tmp_path), sig=sig
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True
    )
    if sig == "SIGINT":  # Python turns it into KeyboardInterrupt, then dies of the signal
        assert "KeyboardInterrupt" in proc.stderr and proc.returncode != 0
    else:
        assert proc.returncode == -getattr(signal, sig), proc.stderr[-2000:]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no torn temp file
    resumed = train_in_fabric(initial_checkpoint(), shards, stage(), CPU, checkpoint_dir=tmp_path)
    assert_same_weights(full.state_dict, resumed.state_dict)
    pd.testing.assert_frame_equal(history_frame(full.history), history_frame(resumed.history))


def test_same_seed_same_metrics_bit_for_bit(shards):
    a = train_in_fabric(initial_checkpoint(), shards, stage(epochs=2, mixup=0.4), CPU)
    b = train_in_fabric(initial_checkpoint(), shards, stage(epochs=2, mixup=0.4), CPU)
    pd.testing.assert_frame_equal(history_frame(a.history), history_frame(b.history))
    assert_same_weights(a.state_dict, b.state_dict)


def test_frozen_stage_leaves_the_body_convolutions_alone(shards):
    start = initial_checkpoint()
    result = train_in_fabric(start, shards, stage(epochs=1, freeze=True, lr=1e-2), CPU)
    assert torch.equal(result.state_dict["0.0.weight"], start["model"]["0.0.weight"])  # conv1
    assert not torch.equal(result.state_dict["0.1.weight"], start["model"]["0.1.weight"])  # bn1
    assert not torch.equal(result.state_dict["1.8.weight"], start["model"]["1.8.weight"])  # head


def test_lr_find_restores_weights_and_suggests(shards):
    start = initial_checkpoint()
    result = lr_find_in_fabric(start, shards, stage(), LrFindOptions(num_it=30), CPU)
    assert 1e-7 <= result["suggestion"] <= 10
    assert len(result["lrs"]) == len(result["losses"]) <= 30
    assert result["lrs"][0] == pytest.approx(1e-7)
    # the sweep diverges before 10 and stops there (stop_div)
    assert result["lrs"][-1] < 10


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload()}, path)
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl"):
        CheckpointDataset(path=str(path)).load()
    safe = CheckpointDataset(path=str(tmp_path / "ok.pt"))
    safe.save({"model": {"w": torch.ones(2)}, "classes": ["a"], "best_metric": 0.5})
    assert safe.load()["classes"] == ["a"]


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_gradient_accumulation_steps_the_optimizer_every_k_batches(shards, tmp_path: Path):
    # 27 training images, batch 6: 4 batches per epoch; with grad_accum 2, 2 optimizer steps.
    train_in_fabric(
        initial_checkpoint(), shards, stage(epochs=1, grad_accum=2), CPU, checkpoint_dir=tmp_path
    )
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["scheduler"]["total_steps"] == 2
    assert saved["scheduler"]["last_epoch"] == 2
    steps = {s["step"].item() for s in saved["optimizer"]["state"].values()}
    assert steps == {2.0}


def test_finished_stage_is_reused_and_other_inputs_are_not(shards, tmp_path: Path, caplog):
    first = train_in_fabric(
        initial_checkpoint(), shards, stage(epochs=1), CPU, checkpoint_dir=tmp_path
    )
    caplog.set_level("INFO", logger="cassava_pipeline")
    again = train_in_fabric(
        initial_checkpoint(), shards, stage(epochs=1), CPU, checkpoint_dir=tmp_path
    )
    assert "finished; reusing it" in caplog.text
    assert_same_weights(first.state_dict, again.state_dict)
    assert again.history == first.history  # not retrained: even the timings are the stored ones
    caplog.clear()
    other = train_in_fabric(
        initial_checkpoint(seed=1), shards, stage(epochs=1), CPU, checkpoint_dir=tmp_path
    )
    assert "another run's" in caplog.text
    assert not torch.equal(other.state_dict["1.8.weight"], first.state_dict["1.8.weight"])
