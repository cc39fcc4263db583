"""Nodes of the cassava_predict pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cassava_pipeline.validation import parse
from cassava_pipeline.vision import allocator
from cassava_pipeline.vision.export import ExportedEnsemble, ExportedModel
from cassava_pipeline.vision.layouts import LayoutError
from cassava_pipeline.vision.learner import RuntimeConfig
from cassava_pipeline.vision.options import STRICT, NonNegativeInt, PositiveInt
from cassava_pipeline.vision.predict import classifier, list_folder
from cassava_pipeline.vision.run import inference_device
from cassava_pipeline.vision.tta import TtaOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictParams:
    """``cassava_predict``: which images, and how they are read and predicted."""

    __pydantic_config__ = STRICT

    images: str | None = None  # the catalog's predict_images reads it (--params=predict.images)
    model: str | None = None  # the catalog's predict_model reads it: a model or ensemble file
    tta: bool = True  # fastai's TTA with the ``tta`` settings; false: plain predictions
    batch_size: PositiveInt = 64  # images per forward pass
    workers: NonNegativeInt = 0  # processes decoding images; 0 = all cores
    chunk_size: PositiveInt = 512  # images decoded and held in memory at a time


def predict_images(
    model: ExportedModel | ExportedEnsemble,
    images_root: Path,
    params: dict[str, Any],
    tta_params: dict[str, Any],
    runtime_params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Probabilities for every readable image under ``images_root``, Kaggle's submission
    (``image_id,label``), and a report naming each image left out and why. A fold ensemble's
    probabilities are the mean of its members' (with TTA when asked); the images are decoded
    once for all of them.

    An unreadable image is logged and reported; it never stops the run.
    """
    if not images_root.is_dir():
        raise LayoutError(
            f"predict.images: {images_root} is not a folder. Give a folder of photos: "
            '--params="predict.images=/path/to/new_photos"'
        )
    names = list_folder(images_root)
    predict = parse(PredictParams, params)
    options = parse(TtaOptions, tta_params) if predict.tta else None
    runtime = parse(RuntimeConfig, runtime_params)
    allocator.apply(runtime.malloc)
    device = inference_device(runtime.accelerator)
    predictor = classifier(model, device=device)
    out = predictor.predict(
        [images_root / n for n in names],
        names=names,
        tta_options=options,
        batch_size=predict.batch_size,
        workers=predict.workers,
        chunk_size=predict.chunk_size,
    )
    for name, reason in out.errors:
        logger.warning("skipped %s: %s", name, reason)
    if not names:
        logger.warning("%s holds no files: the submission is empty", images_root)
    table = out.table()
    counts = table["label"].value_counts()
    card = predictor.card
    members = len(model.members) if isinstance(model, ExportedEnsemble) else 1
    report = {
        "folder": str(images_root),
        "n_files": len(names),
        "n_predicted": len(out.names),
        "n_skipped": len(out.errors),
        "skipped": [{"path": n, "reason": r} for n, r in out.errors],
        "tta": None if options is None else {"n": options.n, "beta": options.beta},
        "predicted_counts": {cid: int(counts.get(cid, 0)) for cid in card.class_ids},
        "model": {
            "arch": card.arch,
            "stage": card.stage,
            "recipe_version": card.recipe_version,
            "image_size": card.image_size,
            "presize": card.presize,
            "members": members,  # > 1: a fold ensemble, probabilities averaged
        },
    }
    logger.info(
        "predicted %d of %d images%s; %d skipped",
        len(out.names),
        len(names),
        " with TTA" if options else "",
        len(out.errors),
    )
    return table, table[["image_id", "label"]].copy(), report
