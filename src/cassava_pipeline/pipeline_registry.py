"""Project pipelines."""

from __future__ import annotations

import warnings

from kedro.pipeline import Pipeline

from cassava_pipeline.pipelines import evaluate, ingest, predict, presize, sample_data, train


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Explicit rather than ``find_pipelines()``: Kedro 1.7 loads only the pipelines named on the
    command line, and ``cassava`` and ``data`` are compositions of several folders.
    ``data`` is the data half of the recipe (a DVC stage), ``train`` the training half,
    ``evaluate`` the TTA evaluation;
    ``cassava`` is the whole recipe and the default; ``cassava_predict`` predicts a folder of new
    images with the exported model; ``sample_data`` draws the embedded sample.
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
    return {
        "sample_data": sample_data.create_pipeline(),
        "ingest": ingest.create_pipeline(),
        "presize": presize.create_pipeline(),
        "data": data,
        "train": training,
        "evaluate": evaluation,
        "cassava": data + training + evaluation,
        "cassava_predict": predict.create_pipeline(),
        "__default__": data + training + evaluation,
    }
