"""Nodes of the presize pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from cassava_pipeline.validation import parse
from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions, upscaled_lines

logger = logging.getLogger(__name__)


def presize_images(
    split_manifest: pd.DataFrame, data_report: dict, raw_images: Path, params: dict[str, Any]
) -> PresizeJob:
    """Describe the presize of every manifest image; the shards dataset carries it out on save."""
    options = parse(PresizeOptions, params)
    for line in upscaled_lines(split_manifest, options.size):
        logger.warning(line)
    classes = tuple(c["name"] for c in data_report["classes"])
    return PresizeJob(
        root=str(raw_images), manifest=split_manifest, classes=classes, options=options
    )
