"""Nodes of the cassava_predict pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from cassava_pipeline.vision import allocator
from cassava_pipeline.vision.export import ExportedModel
from cassava_pipeline.vision.layouts import LayoutError
from cassava_pipeline.vision.predict import Classifier, list_folder
from cassava_pipeline.vision.run import inference_device
from cassava_pipeline.vision.tta import TtaOptions

logger = logging.getLogger(__name__)


def predict_images(
    model: ExportedModel,
    images_root: Path,
    params: dict[str, Any],
    tta_params: dict[str, Any],
    runtime_params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Probabilities for every readable image under ``images_root``, Kaggle's submission
    (``image_id,label``), and a report naming each image left out and why.

    An unreadable image is logged and reported; it never stops the run.
    """
    if not images_root.is_dir():
        raise LayoutError(
            f"predict.images: {images_root} is not a folder. Give a folder of photos: "
            '--params="predict.images=/path/to/new_photos"'
        )
    names = list_folder(images_root)
    options = TtaOptions(**tta_params) if params["tta"] else None
    allocator.apply(runtime_params.get("malloc", allocator.DEFAULT_MODE))
    classifier = Classifier(model, device=inference_device(runtime_params["accelerator"]))
    out = classifier.predict(
        [images_root / n for n in names],
        names=names,
        tta_options=options,
        batch_size=int(params["batch_size"]),
        workers=int(params["workers"]),
        chunk_size=int(params["chunk_size"]),
    )
    for name, reason in out.errors:
        logger.warning("skipped %s: %s", name, reason)
    if not names:
        logger.warning("%s holds no files: the submission is empty", images_root)
    table = out.table()
    counts = table["label"].value_counts()
    report = {
        "folder": str(images_root),
        "n_files": len(names),
        "n_predicted": len(out.names),
        "n_skipped": len(out.errors),
        "skipped": [{"path": n, "reason": r} for n, r in out.errors],
        "tta": None if options is None else {"n": options.n, "beta": options.beta},
        "predicted_counts": {cid: int(counts.get(cid, 0)) for cid in model.card.class_ids},
        "model": {
            "arch": model.card.arch,
            "stage": model.card.stage,
            "recipe_version": model.card.recipe_version,
            "image_size": model.card.image_size,
            "presize": model.card.presize,
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
