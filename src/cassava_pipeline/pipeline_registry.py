"""Project pipelines."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from kedro.framework.project import settings
from kedro.pipeline import Pipeline

from cassava_pipeline.config import LOADER_ARGS, ProjectConfigLoader
from cassava_pipeline.pipelines import cv, evaluate, ingest, predict, presize, sample_data, train
from cassava_pipeline.pipelines.cv.nodes import CvParams
from cassava_pipeline.pipelines.train.pipeline import initial
from cassava_pipeline.validation import parse


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Explicit rather than ``find_pipelines()``: Kedro 1.7 loads only the pipelines named on the
    command line, and ``cassava`` and ``data`` are compositions of several folders.
    ``data`` is the data half of the recipe (a DVC stage), ``train`` the training half,
    ``evaluate`` the TTA evaluation;
    ``cassava`` is the whole recipe and the default; ``cassava_predict`` predicts a folder of new
    images with the exported model; ``sample_data`` draws the embedded sample; ``cassava_cv``
    cross-validates the recipe over ``cv.folds`` folds and exports their ensemble,
    ``cassava_cv_predict`` is ``cassava_predict`` with it, and ``cassava_cv_clean`` trains the
    second round, the suspected mislabels kept, dropped or relabelled (``cv.label_issues``).
    """
    # Kedro warns (once per process) when a node reads a dataset of another namespace, here the
    # names its own pipeline(namespace=...) gave: "small.presized_images" for lr_find and the
    # frozen stage, "mixup.checkpoint" for evaluate. The dots are Kedro's namespacing itself, so
    # the warning offers nothing to act on; it is silenced here, for these pipelines only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        data = ingest.create_pipeline() + presize.create_pipeline()
        training = train.create_pipeline()
        evaluation = evaluate.create_pipeline()
        folds = configured_folds()
        cross_validation = data + initial() + cv.create_pipeline(folds=folds)
        ensemble = cv.predict_pipeline()
        cleaned = cv.clean_pipeline()
    return {
        "sample_data": sample_data.create_pipeline(),
        "ingest": ingest.create_pipeline(),
        "presize": presize.create_pipeline(),
        "data": data,
        "train": training,
        "evaluate": evaluation,
        "cassava": data + training + evaluation,
        "cassava_predict": predict.create_pipeline(),
        "cassava_cv": cross_validation,
        "cassava_cv_predict": ensemble,
        "cassava_cv_clean": cleaned,
        "__default__": data + training + evaluation,
    }


def configured_folds() -> int:
    """``cv.folds`` of the parameter files (conf/base and the environment ``KEDRO_ENV`` names):
    the folds shape the pipeline, and Kedro builds pipelines before it reads ``--params``."""
    conf = Path(settings.CONF_SOURCE)
    if not conf.is_dir():  # a pipeline listed outside the project (kedro-viz, docs)
        return CvParams().folds
    loader = ProjectConfigLoader(str(conf), env=os.environ.get("KEDRO_ENV"), **LOADER_ARGS)
    return parse(CvParams, loader["parameters"].get("cv", {})).folds  # the parameters alone
