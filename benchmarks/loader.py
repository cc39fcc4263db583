"""Images/s delivered to the model: our loader against fastai's DataLoaders, on the same photos.

    make bench-env
    .venv-bench/bin/python benchmarks/loader.py [--images 1000] [--rounds 2]

Data: the training photos of ``../shared/datasets/clothing-small`` (``--images`` of them,
stratified). Both sides deliver augmented, normalised float batches at 224 from a 460 presize,
as the recipe does:

- fastai: ``ImageDataLoaders.from_folder`` with ``item_tfms=Resize(460)`` and
  ``batch_tfms=[*aug_transforms(size=224), Normalize]``, its default workers; one pass over
  ``dls.train``;
- ours: the presized shards (presize 460 written once beforehand, timed separately, as Kedro's
  ``presize`` node does before training) read by our loader (random crop + collate) and
  ``BatchAugment`` (one resample per batch).

Both sides run in this one process with glibc's malloc set as ours sets it by default
(``runtime.malloc: tuned``, ``vision/allocator.py``).

Target (issue 6): ours at least 2x fastai. Each figure is the best of ``--rounds`` rounds, the
order alternating.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cassava_pipeline.vision.augment import AugmentOptions, BatchAugment
from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.ingest import IngestOptions, ingest
from cassava_pipeline.vision.layouts import FolderLayout
from cassava_pipeline.vision.learner import RuntimeConfig, StageConfig, Trainer
from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions, write_shards
from cassava_pipeline.vision.run import make_fabric
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.split import SplitOptions, split
from fastai_compare import prepare_data

MEAN = STD = (0.5, 0.5, 0.5)  # tf_efficientnet_lite0's statistics


def presize(data: Path, out: Path, size: int) -> tuple[ShardedImages, float]:
    t = time.perf_counter()
    manifest, report = ingest(data, FolderLayout(valid_folder="validation"), IngestOptions())
    classes = [c["name"] for c in report["classes"]]
    manifest, _ = split(manifest, classes, SplitOptions())
    write_shards(PresizeJob(str(data), manifest, tuple(classes), PresizeOptions(size=size)), out)
    return ShardedImages(out), time.perf_counter() - t


def ours(
    shards: ShardedImages,
    size: int,
    batch_size: int,
    workers: int,
    *,
    augment: bool = True,
    limit: int | None = None,
) -> tuple[float, int]:
    """(seconds, images) of one pass of our training loader over ``shards``' training side (a
    seeded random ``limit`` of it): read, crop, collate, and ``BatchAugment`` when ``augment``
    (benchmarks/scale.py times it without: on a GPU the augmentation runs on the GPU)."""
    train, _ = shards.split()
    if limit is not None and limit < len(train):
        train = train.subset(np.random.default_rng(0).permutation(len(train))[:limit])
    cfg = StageConfig(
        name="bench",
        epochs=1,
        lr=1e-3,
        freeze=False,
        size=size,
        augment=AugmentOptions(min_scale=0.75),
        loader=LoaderOptions(batch_size=batch_size, num_workers=workers),
    )
    fabric = make_fabric(RuntimeConfig(accelerator="cpu", progress=False))
    stats = type("Stats", (), {"mean": MEAN, "std": STD})()
    trainer = Trainer(fabric, torch.nn.Identity(), stats, progress=False)
    loader, _ = trainer.loaders(train, train, cfg)
    aug = BatchAugment(cfg.augmentation, MEAN, STD)
    gen = torch.Generator().manual_seed(0)
    n = 0
    t = time.perf_counter()
    for images, _ in loader:
        x = aug(images, train=True, generator=gen) if augment else images
        n += x.shape[0]
    return time.perf_counter() - t, n


def fastai_loader(data: Path, presize_: int, size: int, batch_size: int) -> tuple[float, int]:
    from fastai.data.transforms import Normalize
    from fastai.vision.augment import Resize, aug_transforms
    from fastai.vision.data import ImageDataLoaders

    dls = ImageDataLoaders.from_folder(
        data,
        train="train",
        valid="validation",
        item_tfms=Resize(presize_),
        batch_tfms=[*aug_transforms(size=size), Normalize.from_stats(list(MEAN), list(STD))],
        bs=batch_size,
        seed=0,
        device=torch.device("cpu"),
    )
    n = 0
    t = time.perf_counter()
    for x, _ in dls.train:
        n += x.shape[0]
    return time.perf_counter() - t, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000, help="training photos used")
    p.add_argument("--presize", type=int, default=460)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import fastai

    from cassava_pipeline.vision.allocator import tune_malloc

    tune_malloc()

    print(
        f"# loader benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"fastai {fastai.__version__}"
    )
    best: dict[str, float] = {}

    def keep(name: str, seconds: float, n: int) -> None:
        best[name] = max(best.get(name, 0.0), n / seconds)

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(Path(tmp), args.images)
        shards, presize_s = presize(data, Path(tmp) / "shards", args.presize)
        n_train = len(shards.split()[0])
        print(f"# {n_train} training photos; presize {args.presize} once: {presize_s:.1f} s "
              f"({n_train / presize_s:.0f} img/s, ingest + split included)")  # fmt: skip
        for r in range(args.rounds):
            for which in ("fastai", "ours") if r % 2 == 0 else ("ours", "fastai"):
                if which == "fastai":
                    keep("fastai DataLoaders", *fastai_loader(
                        data, args.presize, args.size, args.batch_size))  # fmt: skip
                else:
                    keep("ours, workers 0", *ours(shards, args.size, args.batch_size, 0))
                    keep("ours, workers 2", *ours(shards, args.size, args.batch_size, 2))
    for name, value in best.items():
        print(f"| {name} | {value:.1f} img/s |")
    ratio = max(best["ours, workers 0"], best["ours, workers 2"]) / best["fastai DataLoaders"]
    ratio0 = best["ours, workers 0"] / best["fastai DataLoaders"]
    print(f"ours (best) / fastai = {ratio:.2f}; ours with workers 0 / fastai = {ratio0:.2f} "
          f"(target >= 2): {'met' if ratio >= 2 else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
