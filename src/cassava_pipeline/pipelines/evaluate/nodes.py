"""Nodes of the evaluate pipeline."""

from __future__ import annotations

import logging
from typing import Any

import torch

from cassava_pipeline.pipelines.train.nodes import stage_config
from cassava_pipeline.vision.metrics import classification_metrics
from cassava_pipeline.vision.run import model_from_checkpoint
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.tta import TtaOptions, tta

logger = logging.getLogger(__name__)


def _device(runtime: dict[str, Any]) -> torch.device:
    wants_cuda = runtime["accelerator"] in ("auto", "cuda", "gpu")
    return torch.device("cuda" if wants_cuda and torch.cuda.is_available() else "cpu")


def evaluate(
    checkpoint: dict[str, Any],
    presized_images: ShardedImages,
    stage_params: dict[str, Any],
    tta_params: dict[str, Any],
    runtime_params: dict[str, Any],
) -> dict[str, Any]:
    """Validation metrics of the final model, plain and with fastai's TTA (n passes, beta blend).

    The augmentations and image size are the last training stage's.
    """
    cfg = stage_config("evaluate", stage_params, 0.0)
    options = TtaOptions(**tta_params)
    model, stats = model_from_checkpoint(checkpoint)
    _, valid = presized_images.split()
    out = tta(model, valid, stats, cfg.augment, cfg.loader, options, device=_device(runtime_params))
    classes = checkpoint["classes"]
    result = {
        "stage": checkpoint["stage"],
        "image_size": cfg.augment.size,
        "tta": {"n": options.n, "beta": options.beta, "use_max": options.use_max},
        "plain": classification_metrics(out["plain"], out["targets"], classes),
        "with_tta": classification_metrics(out["tta"], out["targets"], classes),
    }
    logger.info(
        "validation (%d images): accuracy %.4f plain, %.4f with TTA (n=%d, beta=%.2f%s)",
        result["plain"]["n"],
        result["plain"]["accuracy"],
        result["with_tta"]["accuracy"],
        options.n,
        options.beta,
        ", use_max" if options.use_max else "",
    )
    return result
