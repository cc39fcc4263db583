"""Ours' side of the float64 lock-step check against fastai's Learner (tests/test_lockstep.py,
benchmarks/fastai_lockstep.py, which writes ``tests/golden/lockstep.json``).

Thirty 32x32 PNGs at the presize (``tests/golden/lockstep/``, train/ and valid/ folders of three
classes), so neither side resamples; augmentation and dropout off; every stage at precision
64-true; frozen (one lr), unfrozen (discriminative lrs) and mixup (alpha 0.4), label smoothing
0.1 throughout, each for two epochs, fit_one_cycle's last epoch kept (``monitor: last``, as
fastai without SaveModelCallback), AdamW's state carried into mixup as fastai's Learner keeps it.
fastai is fed exactly the normalized tensors ours' batch pipeline makes, in ours' sampler order,
with ours' MixUp draws, so that only the training math is compared.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cassava_pipeline.vision.augment import AugmentOptions, BatchAugment
from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.ingest import IngestOptions, ingest
from cassava_pipeline.vision.layouts import FolderLayout
from cassava_pipeline.vision.learner import RuntimeConfig, StageConfig
from cassava_pipeline.vision.models import create_model
from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions, write_shards
from cassava_pipeline.vision.run import train_in_fabric
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.split import SplitOptions, split

IMAGES = Path(__file__).parent / "golden" / "lockstep"
CLASSES = ("blue", "green", "red")
SIZE = 32
BATCH = 6
AUG_OFF = AugmentOptions(
    min_scale=1.0,
    do_flip=False,
    max_rotate=0.0,
    min_zoom=1.0,
    max_zoom=1.0,
    max_warp=0.0,
    p_affine=0.0,
    max_lighting=0.0,
    p_lighting=0.0,
)
F64 = RuntimeConfig(accelerator="cpu", precision="64-true", progress=False)
_COMMON = dict(
    epochs=2,
    size=SIZE,
    augment=AUG_OFF,
    loader=LoaderOptions(batch_size=BATCH, num_workers=0),
    label_smoothing=0.1,
    monitor="last",
    channels_last=False,
)
STAGES = (
    StageConfig(name="frozen", freeze=True, lr=2e-3, **_COMMON),
    StageConfig(name="unfrozen", freeze=False, lr=(1e-5, 1e-3), **_COMMON),
    StageConfig(name="mixup", freeze=False, lr=(1e-6, 1e-4), mixup=0.4, **_COMMON),
)
ARCH = "resnet18"


def write_images(root: Path = IMAGES) -> None:
    """The PNGs: per class a base colour with smooth noise, 8 training and 2 validation each."""
    rng = np.random.default_rng(0)
    base = {"blue": (40, 60, 200), "green": (50, 180, 60), "red": (200, 50, 40)}
    for side, n in (("train", 8), ("valid", 2)):
        for name in CLASSES:
            folder = root / side / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.normal(0, 40, (SIZE // 4, SIZE // 4, 3)).repeat(4, 0).repeat(4, 1)
                pixels = np.clip(np.array(base[name]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def shards(tmp: Path, root: Path = IMAGES) -> ShardedImages:
    """Ours' shards of the PNGs (the layout's own train/valid split), presized at SIZE."""
    manifest, report = ingest(root, FolderLayout(), IngestOptions(workers=1))
    classes = [c["name"] for c in report["classes"]]
    manifest, _ = split(manifest, classes, SplitOptions())
    job = PresizeJob(str(root), manifest, tuple(classes), PresizeOptions(size=SIZE, workers=1))
    write_shards(job, tmp / "shards")
    return ShardedImages(tmp / "shards")


def initial_checkpoint() -> dict[str, Any]:
    """resnet18 (random weights, seed 0) with fastai's head, dropout off, in float64."""
    torch.manual_seed(0)
    model, stats = create_model(ARCH, len(CLASSES), "none", ps=0.0)
    return {
        "arch": ARCH,
        "weights": "none",
        "hidden": 512,
        "ps": 0.0,
        "concat_pool": True,
        "classes": list(CLASSES),
        "mean": list(stats.mean),
        "std": list(stats.std),
        "stage": "initial",
        "model": {
            k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()
        },
    }


def normalized(images: ShardedImages, ckpt: dict[str, Any]) -> torch.Tensor:
    """Every item as ours' training batch pipeline hands it to the model (float32, normalized).
    With augmentation off it is the same tensor in every batch and epoch."""
    batch = torch.stack(
        [torch.from_numpy(np.ascontiguousarray(images[i][0])) for i in range(len(images))]
    )
    x = batch.permute(0, 3, 1, 2).contiguous()
    aug = BatchAugment(AUG_OFF, tuple(ckpt["mean"]), tuple(ckpt["std"]))
    g = torch.Generator().manual_seed(0)
    train = aug(x, train=True, generator=g)
    assert torch.equal(train, aug(x, train=False)), "augmentation is not off"
    return train


def train_ours(images: ShardedImages, stages=STAGES, runtime: RuntimeConfig = F64) -> list[dict]:
    """The three stages through ours' real stage code (train_in_fabric), chained as the train
    node chains them; per stage its history and final weights."""
    ckpt, out = initial_checkpoint(), []
    for cfg in stages:
        result = train_in_fabric(ckpt, images, cfg, runtime)
        ckpt = {
            **ckpt,
            "stage": cfg.name,
            "model": result.state_dict,
            "optimizer": {"freeze": cfg.freeze, "state": result.optimizer_state},
        }
        out.append({"history": result.history, "weights": result.state_dict})
    return out


def weight_summary(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per floating tensor: its sum, its sum of squares and its first three values."""
    out = {}
    for k, t in state.items():
        if t.is_floating_point():
            v = t.double().flatten()
            out[k] = [float(v.sum()), float((v * v).sum()), *map(float, v[:3])]
    return out


def changed(stage: StageConfig, **changes: Any) -> StageConfig:
    """A stage with other settings (the mutation checks)."""
    return replace(stage, **changes)
