"""The figures of fastai's interpretation and training, as matplotlib figures (Agg, no screen).

Each function returns a ``Figure`` of a fixed size in inches; saved at ``dpi`` its pixel size
is ``figsize * dpi``, which the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from .augment import AugmentOptions, BatchAugment
from .data import CroppedItems, EpochSampler, collate_nhwc
from .models import Stats

DPI = 100


def short_name(name: str) -> str:
    """'Cassava Mosaic Disease (CMD)' -> 'CMD' for axis labels."""
    return name[name.rfind("(") + 1 : -1] if name.endswith(")") and "(" in name else name


def confusion_figure(counts: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """fastai's plot_confusion_matrix: counts and row-normalised side by side."""
    cm = np.asarray(counts, dtype=float)
    totals = cm.sum(1, keepdims=True)
    norm = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    labels = [short_name(c) for c in classes]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), dpi=DPI)
    for ax, mat, title, fmt in (
        (axes[0], cm, "counts", "{:.0f}"),
        (axes[1], norm, "row-normalised", "{:.2f}"),
    ):
        ax.imshow(mat, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("Actual")
        ax.set_title(f"Confusion matrix ({title})")
        peak = mat.max() if mat.size else 0
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                color = "white" if mat[i, j] > peak / 2 else "black"
                ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center", color=color)
    fig.tight_layout()
    return fig


def image_grid(
    images: Sequence[np.ndarray], titles: Sequence[str], *, cols: int = 3, title: str
) -> Figure:
    """A grid of HxWx3 uint8 images with a title each (plot_top_losses, show_batch)."""
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), dpi=DPI, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img)
        ax.set_title(t, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def curves_figure(history: pd.DataFrame) -> Figure:
    """Loss and accuracy per epoch across the stages, stage boundaries marked."""
    h = history.reset_index(drop=True)
    x = np.arange(len(h))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=DPI)
    if h.empty:  # every stage switched off (epochs: 0)
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no epochs trained", ha="center", va="center", fontsize=14)
            ax.set_axis_off()
        return fig
    ax1.plot(x, h["train_loss"], marker="o", label="train_loss")
    ax1.plot(x, h["valid_loss"], marker="o", label="valid_loss")
    ax2.plot(x, h["accuracy"], marker="o", color="tab:green", label="accuracy")
    starts = h.index[h["stage"] != h["stage"].shift()].tolist()
    for ax, name in ((ax1, "loss"), (ax2, "accuracy")):
        for s in starts[1:]:
            ax.axvline(s - 0.5, color="grey", linestyle="--", linewidth=1)
        for s in starts:
            ax.annotate(
                h["stage"].iat[s],
                (s, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -12),
                textcoords="offset points",
                fontsize=8,
            )
        ax.set_xlabel("epoch (all stages)")
        ax.set_ylabel(name)
        ax.legend(loc="lower left" if name == "accuracy" else "center right")
    fig.tight_layout()
    return fig


def lr_find_figure(
    lrs: Sequence[float],
    losses: Sequence[float],
    suggestion: float | None,
    skipped: str | None = None,
) -> Figure:
    """fastai's lr_find plot: smoothed loss against a log learning rate, the valley marked
    (or, for a skipped sweep, why it was skipped)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=DPI)
    if skipped or suggestion is None or not len(lrs):
        ax.text(0.5, 0.5, f"lr_find skipped:\n{skipped or 'no sweep'}", ha="center", va="center")
        ax.set_axis_off()
        return fig
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("Learning Rate")
    ax.set_ylabel("Loss")
    idx = int(np.argmin(np.abs(np.log(np.asarray(lrs)) - np.log(suggestion))))
    ax.plot(lrs[idx], losses[idx], "o", color="red", label=f"valley: {suggestion:.2e}")
    ax.legend()
    fig.tight_layout()
    return fig


def augmented_batch(
    images, augment: AugmentOptions, stats: Stats, n: int, seed: int
) -> tuple[list[np.ndarray], list[int]]:
    """fastai's ``show_batch``: the first ``n`` images of a shuffled training epoch (epoch 0's
    order, random crop and augmentations, as the model sees them), denormalised to uint8
    HxWx3, and their labels. Shuffled, as fastai's training DataLoader: the shards hold the
    images in the manifest's order, often one class after another."""
    items = CroppedItems(images, train=True, seed=seed)
    order = EpochSampler(len(images), shuffle=True, seed=seed).indices()[:n]
    x, labels = collate_nhwc([items[(0, i)] for i in order])
    aug = BatchAugment(augment, stats.mean, stats.std)
    out = aug(x, train=True, generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor(stats.mean).view(1, 3, 1, 1)
    std = torch.tensor(stats.std).view(1, 3, 1, 1)
    pixels = ((out * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return list(pixels), labels.tolist()
