"""Predictions with and without test-time augmentation, with fastai's ``Learner.tta`` semantics.

fastai's ``tta(n=4, beta=0.25, use_max=False)`` predicts the validation set ``n`` times with the
*training* transforms (random crop and ``aug_transforms``), averages those probabilities (or takes
their maximum with ``use_max``), predicts once more plainly (centre crop, resize), and returns
``lerp(augmented, plain, beta)`` = 0.75 augmented + 0.25 plain; with ``use_max`` the maximum of
the plain and augmented predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .augment import AugmentOptions, BatchAugment
from .data import CroppedItems, EpochSampler, LoaderOptions, make_loader
from .models import Stats
from .options import STRICT, Fraction, PositiveInt
from .shards import ShardedImages


@dataclass(frozen=True)
class TtaOptions:
    """fastai's ``Learner.tta`` arguments."""

    __pydantic_config__ = STRICT

    n: PositiveInt = 4  # augmented passes
    beta: Fraction = 0.25  # weight of the plain prediction in the blend
    use_max: bool = False  # maximum instead of mean (and instead of the blend)
    seed: int = 42


def blend(aug: torch.Tensor, plain: torch.Tensor, *, beta: float, use_max: bool) -> torch.Tensor:
    """Combine ``n`` augmented predictions (n, N, C) with the plain ones (N, C) as fastai does."""
    combined = aug.max(0).values if use_max else aug.mean(0)
    if use_max:
        return torch.stack([plain, combined]).max(0).values
    return torch.lerp(combined, plain, beta)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: ShardedImages,
    stats: Stats,
    augment: AugmentOptions,
    loader: LoaderOptions,
    *,
    train_transforms: bool,
    epoch: int = 0,
    seed: int = 42,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (N, C) and targets (N,), in the order of ``images``."""
    device = torch.device(device)
    model.eval().to(device)
    items = CroppedItems(images, train=train_transforms, seed=seed)
    sampler = EpochSampler(len(images), shuffle=False, seed=seed)
    sampler.set_epoch(epoch)
    dl = make_loader(items, sampler, loader, drop_last=False, cuda=device.type == "cuda")
    aug = BatchAugment(augment, stats.mean, stats.std)
    gen = torch.Generator(device=device).manual_seed(seed * 7919 + epoch)
    probs, targets = [], []
    dtype = next(model.parameters()).dtype  # float64 for a model trained at 64-true
    for batch, labels in dl:
        x = aug(batch.to(device), train=train_transforms, generator=gen)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        probs.append(model(x).float().softmax(1).cpu())
        targets.append(labels)
    if not probs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(targets)


def tta(
    model: nn.Module,
    images: ShardedImages,
    stats: Stats,
    augment: AugmentOptions,
    loader: LoaderOptions,
    options: TtaOptions,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Plain probabilities, TTA probabilities and targets for ``images``."""
    common = dict(seed=options.seed, device=device)
    aug = [
        predict(model, images, stats, augment, loader, train_transforms=True, epoch=i, **common)[0]
        for i in range(options.n)
    ]
    plain, targets = predict(
        model, images, stats, augment, loader, train_transforms=False, **common
    )
    blended = blend(torch.stack(aug), plain, beta=options.beta, use_max=options.use_max)
    return {"plain": plain, "tta": blended, "targets": targets}
