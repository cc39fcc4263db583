"""Nodes of the evaluate pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cassava_pipeline.validation import parse
from cassava_pipeline.vision import allocator
from cassava_pipeline.vision.data import CroppedItems
from cassava_pipeline.vision.interpret import (
    classification_report,
    confusion_matrix,
    most_confused,
    top_losses,
)
from cassava_pipeline.vision.learner import RuntimeConfig, StageConfig
from cassava_pipeline.vision.metrics import classification_metrics
from cassava_pipeline.vision.options import STRICT, NonNegativeInt, PositiveInt, check_choices
from cassava_pipeline.vision.plots import (
    augmented_batch,
    confusion_figure,
    curves_figure,
    image_grid,
    lr_find_figure,
    short_name,
)
from cassava_pipeline.vision.provenance import shards_difference
from cassava_pipeline.vision.run import inference_device, model_from_checkpoint
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.tta import TtaOptions, tta

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterpretParams:
    """fastai's ``ClassificationInterpretation`` figures."""

    __pydantic_config__ = STRICT

    predictions: Literal["tta", "plain"] = "tta"  # which predictions the figures show
    top_k: NonNegativeInt = 9  # plot_top_losses(9)
    min_val: PositiveInt = 1  # most_confused(min_val=1)
    show_batch: NonNegativeInt = 9  # images in the show_batch figure

    def __post_init__(self) -> None:
        check_choices(self, "interpret")


def evaluate(
    checkpoint: dict[str, Any],
    presized_images: ShardedImages,
    stage_params: dict[str, Any],
    tta_params: dict[str, Any],
    runtime_params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, dict[str, float]]]:
    """Validation metrics of the final model, plain and with fastai's TTA (n passes, beta blend),
    the per-image predictions behind them, and the headline numbers as MLflow metrics
    (``{name: {value, step}}``, step = the global epoch count).

    The augmentations are the last stage's settings; the image size is the one the checkpoint
    was trained at (an earlier stage's when the later ones were switched off with ``epochs: 0``).
    """
    # A model never trained (every stage switched off: still the initial checkpoint) has seen no
    # images; any other must have been trained on these images and split. Another presize of
    # them is fine (the frozen stage's small shards, when the later stages were switched off).
    differs = (
        None
        if checkpoint.get("stage") == "initial"
        else shards_difference(
            checkpoint.get("trained_on"), presized_images.content, ignore=("presize", "pixels")
        )
    )
    if differs is not None:  # e.g. a new split: the validation side may hold training images
        raise ValueError(
            f"The {checkpoint.get('stage')} checkpoint was trained on other shards than the "
            f"ones being evaluated ({differs}): its scores would not be validation scores. "
            "Train again on these shards: kedro run --pipelines=train (or dvc repro)."
        )
    _, valid = presized_images.split()
    cfg = parse(StageConfig, stage_params).trained_at(checkpoint)
    options = parse(TtaOptions, tta_params)
    out, predictions = score(checkpoint, valid, cfg, options, parse(RuntimeConfig, runtime_params))
    classes = checkpoint["classes"]
    result = {
        "stage": checkpoint["stage"],  # the stage the final weights come from
        "skipped": list(checkpoint.get("skipped", [])),
        # which of that stage's epochs the weights are (0-based): the best by `monitor`, or the
        # last one with monitor: last
        "kept_epoch": checkpoint.get("best_epoch"),
        "monitor": checkpoint.get("monitor"),
        "image_size": cfg.size,
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
    step = int(checkpoint.get("global_epochs", 0))
    tracked = {
        f"{prefix}{name}": {"value": float(result[kind][name]), "step": step}
        for kind, prefix in (("plain", ""), ("with_tta", "tta_"))
        for name in ("accuracy", "error_rate", "cross_entropy", "balanced_accuracy")
    }
    if checkpoint.get("best_epoch") is not None:
        tracked["kept_epoch"] = {"value": float(checkpoint["best_epoch"]), "step": step}
    return result, predictions, tracked


def score(
    checkpoint: dict[str, Any],
    images: ShardedImages,
    cfg: StageConfig,
    options: TtaOptions,
    runtime: RuntimeConfig,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """fastai's ``tta`` of the checkpoint's model on ``images`` with ``cfg``'s augmentation, and
    the per-image table: path, actual, predicted and probabilities, plain and TTA."""
    allocator.apply(runtime.malloc)
    model, stats = model_from_checkpoint(checkpoint)
    device = inference_device(runtime.accelerator)
    out = tta(model, images, stats, cfg.augmentation, cfg.loader, options, device=device)
    predictions = pd.DataFrame({"path": images.index["path"], "actual": out["targets"].numpy()})
    for kind in ("plain", "tta"):
        probs = out[kind].numpy()
        predictions[f"predicted_{kind}"] = probs.argmax(1)
        for i in range(probs.shape[1]):
            predictions[f"p_{kind}_{i}"] = probs[:, i]
    return out, predictions


def _probs(predictions: pd.DataFrame, kind: str, n_classes: int) -> np.ndarray:
    return predictions[[f"p_{kind}_{i}" for i in range(n_classes)]].to_numpy()


def interpret(
    predictions: pd.DataFrame, checkpoint: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any]:
    """fastai's ClassificationInterpretation of the validation predictions (TTA or plain)."""
    options = parse(InterpretParams, params)
    classes = list(checkpoint["classes"])
    kind = options.predictions
    probs = _probs(predictions, kind, len(classes))
    targets = predictions["actual"].to_numpy()
    top = top_losses(probs, targets, options.top_k)
    for row in top:
        row["path"] = str(predictions["path"].iat[row["index"]])
        row["predicted"] = classes[row["predicted"]]
        row["actual"] = classes[row["actual"]]
    confused = most_confused(probs, targets, classes, options.min_val)
    for actual, predicted, count in confused[:10]:
        logger.info("most confused: %s -> %s: %d", actual, predicted, count)
    return {
        "predictions": kind,
        "classes": classes,
        "confusion_matrix": confusion_matrix(probs, targets, len(classes)).tolist(),
        "confusion_matrix_normalized": confusion_matrix(
            probs, targets, len(classes), normalize=True
        ).tolist(),
        "most_confused": [list(c) for c in confused],
        "top_losses": top,
        "classification_report": classification_report(probs, targets, classes),
    }


def plot_report(
    interpretation: dict[str, Any],
    presized_images: ShardedImages,
    checkpoint: dict[str, Any],
    lr_find_result: dict[str, Any],
    frozen_history: pd.DataFrame,
    unfrozen_history: pd.DataFrame,
    mixup_history: pd.DataFrame,
    stage_params: dict[str, Any],
    params: dict[str, Any],
) -> tuple[Figure, Figure, Figure, Figure, Figure]:
    """Confusion matrix, top losses, training curves, lr_find and show_batch figures."""
    classes = interpretation["classes"]
    confusion = confusion_figure(interpretation["confusion_matrix"], classes)
    _, valid = presized_images.split()
    position = {p: i for i, p in enumerate(valid.index["path"])}
    crops = CroppedItems(valid, train=False, seed=0)
    top = interpretation["top_losses"]
    losses = image_grid(
        [crops[(0, position[t["path"]])][0] for t in top],
        [
            f"{short_name(t['predicted'])}/{short_name(t['actual'])} / {t['loss']:.2f} / "
            f"{t['probability']:.2f}"
            for t in top
        ],
        title="Prediction/Actual/Loss/Probability",
    )
    history = pd.concat([frozen_history, unfrozen_history, mixup_history], ignore_index=True)
    curves = curves_figure(history)
    lr_plot = lr_find_figure(
        lr_find_result["lrs"],
        lr_find_result["losses"],
        lr_find_result["suggestion"],
        skipped=lr_find_result.get("skipped"),
    )
    cfg = parse(StageConfig, stage_params)
    train, _ = presized_images.split()
    _, stats = model_from_checkpoint(checkpoint)
    n = parse(InterpretParams, params).show_batch
    imgs, labels = augmented_batch(train, cfg.augmentation, stats, n, cfg.seed)
    labels = [classes[i] for i in labels]
    batch = image_grid(imgs, [short_name(c) for c in labels], title="show_batch (augmented)")
    return confusion, losses, curves, lr_plot, batch
