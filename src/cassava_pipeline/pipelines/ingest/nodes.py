"""Nodes of the ingest pipeline: thin adapters from catalog objects to ``vision``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from cassava_pipeline.validation import parse
from cassava_pipeline.vision.ingest import (
    IngestOptions,
    check_exclusions,
    ingest,
    summarise,
    unusual_lines,
)
from cassava_pipeline.vision.split import SplitOptions, check_classes, split

logger = logging.getLogger(__name__)


def ingest_images(raw_images: Path, params: dict[str, Any]) -> tuple[pd.DataFrame, dict]:
    """List the images of the configured layout, verify each one and report what was excluded."""
    options = parse(IngestOptions, params)
    manifest, report = ingest(raw_images, options.chosen_layout, options)
    for note in report["layout_notes"]:
        # how the folders were read: a recognised validation folder is news, the rest a warning
        (logger.info if note.startswith("validation folder") else logger.warning)(note)
    for line in summarise(report):
        logger.info(line)
    for line in unusual_lines(report):
        logger.warning(line)
    for row in report["excluded"][:10]:
        detail = f" ({row['detail']})" if row["detail"] else ""
        logger.warning("excluded %s: %s%s", row["path"], row["reason"], detail)
    return manifest, report


def check_ingest(
    candidates: pd.DataFrame, data_report: dict, params: dict[str, Any]
) -> pd.DataFrame:
    """Pass the manifest on, or stop the run when too many files were excluded.

    A node of its own so that the data report is already saved when the run stops.
    """
    check_exclusions(data_report, parse(IngestOptions, params))
    return candidates


def split_manifest(
    manifest: pd.DataFrame, data_report: dict, params: dict[str, Any]
) -> tuple[pd.DataFrame, dict]:
    """Fill ``is_valid``: the layout's own split, or a stratified random one; report the counts."""
    options = parse(SplitOptions, params)
    classes = [c["name"] for c in data_report["classes"]]
    result, report = split(manifest, classes, options)
    logger.info(
        "split (%s): %d train, %d valid; %d duplicate groups, %d duplicates moved to train",
        report["method"],
        report["n_train"],
        report["n_valid"],
        report["duplicate_groups"],
        report["duplicates_moved_to_train"],
    )
    for c in report["classes"]:
        logger.info("  %-40s train %5d  valid %5d", c["name"], c["train"], c["valid"])
    check_classes(report)
    for line in report["warnings"]:
        logger.warning("split: %s", line)
    groups = report["duplicates_with_conflicting_labels"]
    if groups:
        kept = not report["conflicting_duplicates_excluded"]
        logger.warning(
            "%d group(s) of byte-identical files carry different labels (at least one label is "
            "wrong): %s. %s",
            len(groups),
            "; ".join(" = ".join(g) for g in groups[:10]) + (" ..." if len(groups) > 10 else ""),
            "Kept, as split.keep_conflicting_duplicates asks."
            if kept
            else "Every copy is left out of training and validation; fix the labels, or set "
            "split.keep_conflicting_duplicates: true to keep them.",
        )
    return result, report
