"""Project pipelines."""

from __future__ import annotations

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
