"""Nodes of the training pipeline: parameters in, frozen dataclasses out, ``vision`` works."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cassava_pipeline import __version__
from cassava_pipeline.tracking import EpochLogger
from cassava_pipeline.vision.augment import AugmentOptions
from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.export import ExportedModel, export_checkpoint
from cassava_pipeline.vision.images import DEFAULT_MAX_PIXELS
from cassava_pipeline.vision.kept import KeepPolicy
from cassava_pipeline.vision.learner import HISTORY_COLUMNS, RuntimeConfig, StageConfig
from cassava_pipeline.vision.models import create_model
from cassava_pipeline.vision.run import lr_find_in_fabric, train_in_fabric
from cassava_pipeline.vision.schedule import LrFindOptions, OneCycle
from cassava_pipeline.vision.shards import ShardedImages

logger = logging.getLogger(__name__)

RECIPE_VERSION = f"cassava-pipeline {__version__}"


def stage_config(name: str, p: dict[str, Any], lr: float | tuple[float, float]) -> StageConfig:
    """A stage's parameters (``<stage>.train``) as the frozen dataclass ``vision`` takes."""
    aug = AugmentOptions(**p["augment"], size=int(p["size"]))
    return StageConfig(
        name=name,
        epochs=int(p["epochs"]),
        lr=lr,
        freeze=bool(p["freeze"]),
        augment=aug,
        cycle=OneCycle(
            div=float(p["one_cycle"]["div"]),
            div_final=float(p["one_cycle"]["div_final"]),
            pct_start=float(p["one_cycle"]["pct_start"]),
            moms=tuple(float(m) for m in p["one_cycle"]["moms"]),
        ),
        loader=LoaderOptions(**p["loader"]),
        wd=float(p["wd"]),
        mixup=float(p["mixup"]),
        label_smoothing=float(p["label_smoothing"]),
        monitor=str(p["monitor"]),
        grad_accum=int(p["grad_accum"]),
        channels_last=bool(p["channels_last"]),
        compile=bool(p["compile"]),
        seed=int(p["seed"]),
        validate_before=bool(p["validate_before"]),
        optimizer_state=str(p.get("optimizer_state", "fastai")),
    )


def final_stage_config(name: str, p: dict[str, Any], checkpoint: dict[str, Any]) -> StageConfig:
    """The last stage's settings at the image size ``checkpoint`` was trained at: an earlier
    stage's when the later ones were switched off (``epochs: 0``)."""
    cfg = stage_config(name, p, 0.0)
    size = int(checkpoint.get("image_size", cfg.augment.size))
    return replace(cfg, augment=replace(cfg.augment, size=size))


def _runtime(p: dict[str, Any]) -> RuntimeConfig:
    return RuntimeConfig(**{**p, "keep": KeepPolicy(**p["keep"])})


def _resolve_lr(lr: Any, lr_find_result: dict) -> float | tuple[float, float]:
    if lr == "auto":
        if lr_find_result.get("suggestion") is None:  # pragma: no cover - find_lr ran for it
            raise ValueError("lr: auto, but lr_find was skipped")
        return float(lr_find_result["suggestion"])
    if isinstance(lr, list | tuple):  # fastai's slice: [high] or [low, high]
        return tuple(float(v) for v in lr)
    return float(lr)


def init_model(data_report: dict, model_params: dict[str, Any]) -> dict[str, Any]:
    """Build the model with its pretrained body and a fresh fastai head: the first checkpoint."""
    classes = [c["name"] for c in data_report["classes"]]
    torch.manual_seed(int(model_params["seed"]))  # the head's initialisation
    model, stats = create_model(
        model_params["arch"],
        len(classes),
        str(model_params["weights"]),
        hidden=int(model_params["hidden"]),
        ps=float(model_params["ps"]),
        concat_pool=bool(model_params["concat_pool"]),
    )
    logger.info(
        "model %s (%s weights), %d classes, %.1fM parameters",
        model_params["arch"],
        model_params["weights"],
        len(classes),
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return {
        "recipe_version": RECIPE_VERSION,
        "arch": model_params["arch"],
        "weights": str(model_params["weights"]),
        "hidden": int(model_params["hidden"]),
        "ps": float(model_params["ps"]),
        "concat_pool": bool(model_params["concat_pool"]),
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
    stages = all_stage_params or (stage_params,)
    wanted = any(p["lr"] == "auto" and int(p["epochs"]) > 0 for p in stages)
    sweep = {k: v for k, v in lr_find_params.items() if k != "always"}
    if not wanted and not lr_find_params.get("always", False):
        reason = "no training stage uses lr: auto"
        logger.info("lr_find: skipped, %s (lr_find.always: true sweeps anyway)", reason)
        return {"skipped": reason, "lrs": [], "losses": [], "suggestion": None}
    options = LrFindOptions(**sweep)
    cfg = stage_config("lr_find", stage_params, options.start_lr)
    return lr_find_in_fabric(
        checkpoint,
        presized_images,
        cfg,
        options,
        _runtime(runtime_params),
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
    name = str(stage_params["name"])
    if int(stage_params["epochs"]) == 0:
        logger.info(
            "%s: epochs 0, stage skipped; the %s checkpoint passes on unchanged",
            name,
            checkpoint.get("stage", "initial"),
        )
        skipped = [*checkpoint.get("skipped", []), name]
        return {**checkpoint, "skipped": skipped}, pd.DataFrame(columns=list(HISTORY_COLUMNS))
    cfg = stage_config(name, stage_params, _resolve_lr(stage_params["lr"], lr_find_result))
    logger.info("%s: %d epochs at lr %s, size %d", name, cfg.epochs, cfg.lr, cfg.augment.size)
    first_epoch = int(checkpoint.get("global_epochs", 0))  # epochs of the stages before
    tracker = EpochLogger.for_active_run(offset=first_epoch)  # live curves in MLflow
    result = train_in_fabric(
        checkpoint,
        presized_images,
        cfg,
        _runtime(runtime_params),
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
        "image_size": cfg.augment.size,
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
    cfg = final_stage_config("export", stage_params, checkpoint)
    class_ids = [str(c.get("source_id") or c["name"]) for c in data_report["classes"]]
    exported = export_checkpoint(
        checkpoint,
        class_ids=class_ids,
        augment=cfg.augment,
        presize=int(checkpoint.get("presize", presize_params["size"])),
        jpeg_draft=bool(presize_params["jpeg_draft"]),
        max_image_pixels=int(presize_params.get("max_image_pixels", DEFAULT_MAX_PIXELS)),
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
