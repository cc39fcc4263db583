"""Tiny data and models for training tests: seconds on a CPU, real code paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cassava_pipeline.vision.augment import AugmentOptions
from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.export import ExportedModel, export_checkpoint
from cassava_pipeline.vision.ingest import IngestOptions, ingest
from cassava_pipeline.vision.layouts import FolderLayout
from cassava_pipeline.vision.learner import StageConfig
from cassava_pipeline.vision.models import create_model
from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions, write_shards
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.split import SplitOptions, split
from tests.images import jpeg_bytes

CLASSES = ("blue", "green", "red")


def coloured_images(root: Path, per_class: int = 12, w: int = 48, h: int = 40) -> Path:
    """A learnable folder-per-class set: noisy images dominated by one colour channel."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            img = rng.integers(0, 120, (h, w, 3))
            img[..., 2 - c] += 120
            (root / name / f"{j}.jpg").write_bytes(jpeg_bytes(img.astype(np.uint8)))
    return root


def tiny_shards(
    tmp: Path, presize: int = 40, per_class: int = 12, split_seed: int = 0
) -> ShardedImages:
    """Presized shards of :func:`coloured_images`, split 75/25."""
    root = coloured_images(tmp / "raw", per_class)
    manifest, report = ingest(root, FolderLayout(), IngestOptions(workers=1))
    classes = [c["name"] for c in report["classes"]]
    manifest, _ = split(manifest, classes, SplitOptions(valid_pct=0.25, seed=split_seed))
    write_shards(
        PresizeJob(str(root), manifest, tuple(classes), PresizeOptions(size=presize, workers=1)),
        tmp / "shards",
    )
    return ShardedImages(tmp / "shards")


AUG = AugmentOptions(size=32, min_scale=0.75)


def exported(presize: int = 40) -> ExportedModel:
    """A self-describing resnet18 (random weights) for the three test classes."""
    ckpt = {**initial_checkpoint("resnet18"), "recipe_version": "test 1", "stage": "mixup"}
    return export_checkpoint(ckpt, class_ids=["0", "1", "2"], augment=AUG, presize=presize)


def initial_checkpoint(arch: str = "resnet18", n_classes: int = 3, seed: int = 0) -> dict:
    """What the init_model node produces, for a randomly initialised model."""
    torch.manual_seed(seed)
    model, stats = create_model(arch, n_classes, "none")
    return {
        "arch": arch,
        "weights": "none",
        "hidden": 512,
        "ps": 0.5,
        "concat_pool": True,
        "classes": list(CLASSES[:n_classes]),
        "mean": list(stats.mean),
        "std": list(stats.std),
        "stage": "initial",
        "model": model.state_dict(),
    }


def stage(epochs: int = 3, **kw) -> StageConfig:
    """A small unfrozen stage at 32 px with batch size 6."""
    return StageConfig(
        name=kw.pop("name", "test"),
        epochs=epochs,
        lr=kw.pop("lr", (1e-4, 1e-2)),
        freeze=kw.pop("freeze", False),
        size=32,
        augment=AugmentOptions(min_scale=0.75),
        loader=LoaderOptions(batch_size=6, num_workers=0),
        **kw,
    )


class Interrupted(Exception):
    """Raised by :func:`interrupted_fit` after an epoch, as a killed process stops."""


def interrupted_fit(shards: ShardedImages, cfg: StageConfig, checkpoint_dir: Path, epochs: int):
    """Fit ``cfg`` on ``shards`` and stop after ``epochs`` epochs (their resume files written),
    as an interrupted run would."""
    from cassava_pipeline.vision.learner import RuntimeConfig, Trainer
    from cassava_pipeline.vision.run import make_fabric, model_from_checkpoint

    def stop(row: dict) -> None:
        if row["epoch"] + 1 >= epochs:
            raise Interrupted

    model, stats = model_from_checkpoint(initial_checkpoint())
    trainer = Trainer(make_fabric(RuntimeConfig(accelerator="cpu")), model, stats, progress=False)
    train, valid = shards.split()
    try:
        trainer.fit(train, valid, cfg, checkpoint_dir=checkpoint_dir, on_epoch=stop)
    except Interrupted:
        return
    raise AssertionError(f"{cfg.name} finished before epoch {epochs}")


def history_frame(history: list[dict]) -> pd.DataFrame:
    """History without wall-clock times (which never repeat)."""
    return pd.DataFrame(history).drop(columns=["seconds"])
