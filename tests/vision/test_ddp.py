"""Data parallelism: two CPU processes (gloo) through Lightning Fabric, as `devices: 2` runs."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from cassava_pipeline.vision.augment import BatchAugment
from cassava_pipeline.vision.learner import RuntimeConfig, Trainer
from cassava_pipeline.vision.run import make_fabric, model_from_checkpoint, train_in_fabric
from cassava_pipeline.vision.shards import ShardedImages
from tests.training import initial_checkpoint, stage, tiny_shards


def _worker(fabric, *, checkpoint, shards_dir, cfg, result_path):
    torch.set_num_threads(1)
    model, stats = model_from_checkpoint(checkpoint)
    train, valid = ShardedImages(shards_dir).split()
    trainer = Trainer(fabric, model, stats, progress=False)
    result = trainer.fit(train, valid, cfg)
    flat = torch.cat([v.double().flatten() for v in result.state_dict.values()])
    every_rank = fabric.all_gather(flat)  # (world_size, n)
    _, va = trainer.loaders(train, valid, cfg)
    metrics = trainer.validate(va, BatchAugment(cfg.augmentation, stats.mean, stats.std), cfg)
    out = {
        "every_rank": every_rank,
        "metrics": metrics,
        "state": result.state_dict,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "world": fabric.world_size,
    }
    if fabric.is_global_zero:
        torch.save(out, result_path)


@pytest.mark.slow
def test_two_processes_agree_and_gather_exact_metrics(tmp_path):
    shards = tiny_shards(tmp_path, per_class=11)
    cfg = stage(epochs=2)
    fabric = make_fabric(RuntimeConfig(accelerator="cpu", devices=2, progress=False))
    result_path = tmp_path / "out.pt"
    job = partial(
        _worker,
        checkpoint=initial_checkpoint(),
        shards_dir=str(shards.directory),
        cfg=cfg,
        result_path=result_path,
    )
    fabric.launch(job)
    out = torch.load(result_path, weights_only=True)
    assert out["world"] == 2
    ranks = out["every_rank"]
    assert ranks.shape[0] == 2 and torch.equal(ranks[0], ranks[1])  # identical weights

    # The validation metrics gathered over both ranks equal one process's on the same data.
    single = make_fabric(RuntimeConfig(accelerator="cpu", progress=False))
    ckpt = {**initial_checkpoint(), "model": out["state"]}
    model, stats = model_from_checkpoint(ckpt)
    trainer = Trainer(single, model, stats, progress=False)
    trainer.model = single.setup(model)
    train, valid = shards.split()
    _, va = trainer.loaders(train, valid, cfg)
    one = trainer.validate(va, BatchAugment(cfg.augmentation, stats.mean, stats.std), cfg)
    assert one["accuracy"] == out["metrics"]["accuracy"]
    assert one["valid_loss"] == pytest.approx(out["metrics"]["valid_loss"], rel=1e-5)
    assert len(valid) % 2 == 1  # an odd count: no padding may be double-counted
    # the history logged the metrics of the weights the stage kept (its best epoch's), as
    # gathered over both ranks: the same as validating those weights again
    row = out["history"][out["best_epoch"]]
    assert row["accuracy"] == pytest.approx(out["metrics"]["accuracy"], abs=1e-12)
    assert row["valid_loss"] == pytest.approx(out["metrics"]["valid_loss"], rel=1e-5)


def test_devices_two_through_the_node_api(tmp_path):
    shards = tiny_shards(tmp_path, per_class=6)
    rt = RuntimeConfig(accelerator="cpu", devices=2, progress=False)
    result = train_in_fabric(initial_checkpoint(), shards, stage(epochs=1), rt)
    assert len(result.history) == 1 and result.state_dict["1.8.weight"].shape == (3, 512)
