"""Training and validation batches from presized shards.

Items are cropped to a square of the presize, as fastai's ``Resize(presize)`` item transform
(``ResizeMethod.Crop``): a random position along the longer side when training, the centre when
validating. Batches stay uint8 until the training device (4x less to copy than float) and come
out channels-last: the collate function stacks HxWx3 crops into one pinned NHWC tensor and the
NCHW view of it has channels-last strides for free.

Randomness is a pure function of (seed, epoch, item index), so batches are identical whatever
the number of workers, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .options import STRICT, NonNegativeInt, PositiveInt
from .shards import ShardedImages


class CroppedItems(Dataset):
    """Square crops of a :class:`ShardedImages` view; indexed by (epoch, item) pairs."""

    def __init__(self, images: ShardedImages, *, train: bool, seed: int):
        self.images, self.train, self.seed = images, train, seed
        self.side = images.size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        epoch, i = key
        img, label = self.images[i]
        h, w = img.shape[:2]
        s = min(self.side, h, w)
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, i])
            top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        else:
            top, left = (h - s) // 2, (w - s) // 2
        return img[top : top + s, left : left + s], label


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) pairs: a seeded permutation per epoch, split across ranks.

    Like ``DistributedSampler``: with ``world_size`` ranks each takes every world_size-th item of
    the permutation, padded (``pad``, for training: every rank must take as many steps) or not
    (for validation: each item counted exactly once across ranks).
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation (and the crops) of ``epoch``."""
        self.epoch = epoch

    def indices(self) -> list[int]:
        """This rank's item indices for the current epoch, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world_size > 1:
            if self.pad and order:
                per_rank = -(-self.n // self.world_size)
                order = (order * self.world_size)[: per_rank * self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices()])

    def __len__(self) -> int:
        return len(self.indices())


def collate_nhwc(batch: Sequence[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack HxWx3 uint8 crops into an (n, 3, s, s) channels-last uint8 tensor, and labels."""
    images = torch.from_numpy(np.stack([b[0] for b in batch]))  # (n, s, s, 3)
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images.permute(0, 3, 1, 2), labels


@dataclass(frozen=True)
class LoaderOptions:
    """DataLoader settings."""

    __pydantic_config__ = STRICT

    batch_size: PositiveInt = 64  # fastai's default bs
    num_workers: NonNegativeInt = 0  # 0: load in the training process
    pin_memory: bool = True  # only used with CUDA
    persistent_workers: bool = True
    prefetch_factor: PositiveInt = 2


def make_loader(
    items: CroppedItems,
    sampler: EpochSampler,
    options: LoaderOptions,
    *,
    drop_last: bool,
    cuda: bool,
) -> DataLoader:
    """A DataLoader of uint8 NCHW (channels-last) batches."""
    workers = options.num_workers
    return DataLoader(
        items,
        batch_size=options.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_nhwc,
        pin_memory=options.pin_memory and cuda,
        drop_last=drop_last,
        persistent_workers=options.persistent_workers and workers > 0,
        prefetch_factor=options.prefetch_factor if workers > 0 else None,
    )
