"""Nodes of the training pipeline: parameters in, validated dataclasses out, ``vision`` works."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cassava_pipeline import __version__
from cassava_pipeline.tracking import EpochLogger
from cassava_pipeline.validation import parse
from cassava_pipeline.vision.export import ExportedModel, export_checkpoint
from cassava_pipeline.vision.learner import HISTORY_COLUMNS, RuntimeConfig, StageConfig
from cassava_pipeline.vision.models import ModelOptions, create_model
from cassava_pipeline.vision.presize import PresizeOptions
from cassava_pipeline.vision.run import lr_find_in_fabric, train_in_fabric
from cassava_pipeline.vision.schedule import LrFindOptions
from cassava_pipeline.vision.shards import ShardedImages

logger = logging.getLogger(__name__)

RECIPE_VERSION = f"cassava-pipeline {__version__}"


@dataclass(frozen=True, kw_only=True)
class LrFindParams(LrFindOptions):
    """fastai's ``lr_find`` options, and when the pipeline runs it."""

    always: bool = False  # sweep even when no stage uses lr: auto (for the plot alone)


def _resolve_lr(cfg: StageConfig, lr_find_result: dict) -> StageConfig:
    """``lr: auto`` replaced by lr_find's suggestion."""
    if cfg.lr != "auto":
        return cfg
    if lr_find_result.get("suggestion") is None:  # pragma: no cover - find_lr ran for it
        raise ValueError("lr: auto, but lr_find was skipped")
    return replace(cfg, lr=float(lr_find_result["suggestion"]))


def init_model(data_report: dict, model_params: dict[str, Any]) -> dict[str, Any]:
    """Build the model with its pretrained body and a fresh fastai head: the first checkpoint."""
    options = parse(ModelOptions, model_params)
    classes = [c["name"] for c in data_report["classes"]]
    torch.manual_seed(options.seed)  # the head's initialisation
    model, stats = create_model(
        options.arch,
        len(classes),
        options.weights,
        hidden=options.hidden,
        ps=options.ps,
        concat_pool=options.concat_pool,
    )
    logger.info(
        "model %s (%s weights), %d classes, %.1fM parameters",
        options.arch,
        options.weights,
        len(classes),
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return {
        "recipe_version": RECIPE_VERSION,
        "arch": options.arch,
        "weights": options.weights,
        "hidden": options.hidden,
        "ps": options.ps,
        "concat_pool": options.concat_pool,
        "classes": classes,
        "mean": list(stats.mean),
        "std": list(stats.std),
        "stage": "initial",
        "model": model.state_dict(),
    }


def find_lr(
    checkpoint: dict[str, Any],
    presized_images: ShardedImages,
    resume_dir: Path,
    stage_params: dict[str, Any],
    lr_find_params: dict[str, Any],
    runtime_params: dict[str, Any],
    *all_stage_params: dict[str, Any],
) -> dict[str, Any]:
    """fastai's ``lr_find`` on the first stage's settings; its suggestion serves ``lr: auto``.

    Skipped (``{"skipped": reason, "lrs": [], "losses": [], "suggestion": None}``) when no stage
    that trains (``epochs`` > 0) of ``all_stage_params`` asks for ``lr: auto``, unless
    ``lr_find.always`` (the sweep for its plot alone). The sweep is kept
    in ``resume_dir`` and reused while its inputs are equal, so a resumed run does not sweep
    again (and cannot move the suggestion under finished stages).
    """
    stages = [parse(StageConfig, p) for p in all_stage_params or (stage_params,)]
    options = parse(LrFindParams, lr_find_params)
    if not any(s.lr == "auto" and s.epochs > 0 for s in stages) and not options.always:
        reason = "no training stage uses lr: auto"
        logger.info("lr_find: skipped, %s (lr_find.always: true sweeps anyway)", reason)
        return {"skipped": reason, "lrs": [], "losses": [], "suggestion": None}
    cfg = replace(parse(StageConfig, stage_params), name="lr_find", lr=options.start_lr)
    return lr_find_in_fabric(
        checkpoint,
        presized_images,
        cfg,
        options,
        parse(RuntimeConfig, runtime_params),
        cache_dir=resume_dir,
    )


def train_stage(
    checkpoint: dict[str, Any],
    presized_images: ShardedImages,
    lr_find_result: dict[str, Any],
    resume_dir: Path,
    stage_params: dict[str, Any],
    runtime_params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame]:
    """One ``fit_one_cycle`` stage from the previous stage's checkpoint; returns the best epoch.

    ``epochs: 0`` switches the stage off: the checkpoint passes on unchanged (its ``stage`` still
    names the stage its weights come from, ``skipped`` lists the stages passed over) with an
    empty history, so that e.g. ``fine_tune`` (no mixup) or training unfrozen from the start
    runs the rest of the pipeline as usual.
    """
    cfg = parse(StageConfig, stage_params)
    name = cfg.name
    if cfg.epochs == 0:
        logger.info(
            "%s: epochs 0, stage skipped; the %s checkpoint passes on unchanged",
            name,
            checkpoint.get("stage", "initial"),
        )
        skipped = [*checkpoint.get("skipped", []), name]
        return {**checkpoint, "skipped": skipped}, pd.DataFrame(columns=list(HISTORY_COLUMNS))
    cfg = _resolve_lr(cfg, lr_find_result)
    logger.info("%s: %d epochs at lr %s, size %d", name, cfg.epochs, cfg.lr, cfg.size)
    first_epoch = int(checkpoint.get("global_epochs", 0))  # epochs of the stages before
    # live curves in MLflow; a CV fold's in the fold's own run
    tracker = EpochLogger.for_active_run(offset=first_epoch, fold=presized_images.split_name)
    result = train_in_fabric(
        checkpoint,
        presized_images,
        cfg,
        parse(RuntimeConfig, runtime_params),
        checkpoint_dir=resume_dir,
        on_epoch=tracker,
    )
    history = pd.DataFrame(result.history)
    if tracker is not None:
        tracker.log_missing(history)  # epochs a resumed or reused stage trained earlier
    out = {
        **{k: v for k, v in checkpoint.items() if k not in ("model", "optimizer")},
        "stage": name,
        "global_epochs": first_epoch + cfg.epochs,
        "image_size": cfg.size,
        "presize": presized_images.size,
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "start_metrics": result.start_metrics,
        "trained_on": result.trained_on,  # the shards' content digests (split, presize, ...)
        "monitor": cfg.monitor,
        "model": result.state_dict,
        # for a next stage that goes on from it (optimizer_state: fastai)
        "optimizer": {"freeze": cfg.freeze, "state": result.optimizer_state},
    }
    return out, history


def export_model(
    checkpoint: dict[str, Any],
    data_report: dict[str, Any],
    stage_params: dict[str, Any],
    presize_params: dict[str, Any],
) -> tuple[ExportedModel, ExportedModel]:
    """The final checkpoint as a self-describing safetensors model (``vision.export``), twice:
    for the model file and for the MLflow run (a pyfunc)."""
    cfg = parse(StageConfig, stage_params).trained_at(checkpoint)
    presize = parse(PresizeOptions, presize_params)
    class_ids = [str(c.get("source_id") or c["name"]) for c in data_report["classes"]]
    exported = export_checkpoint(
        checkpoint,
        class_ids=class_ids,
        augment=cfg.augmentation,
        presize=int(checkpoint.get("presize", presize.size)),
        jpeg_draft=presize.jpeg_draft,
        max_image_pixels=presize.max_image_pixels,
        extra={
            "best_epoch": checkpoint.get("best_epoch"),
            "best_metric": checkpoint.get("best_metric"),
            "monitor": checkpoint.get("monitor"),
            "n_images": data_report.get("n_images"),
            "skipped": list(checkpoint.get("skipped", [])),
        },
    )
    logger.info(
        "exported %s (%s stage): %d classes, presize %d, size %d",
        exported.card.arch,
        exported.card.stage,
        len(exported.card.classes),
        exported.card.presize,
        exported.card.image_size,
    )
    return exported, exported
