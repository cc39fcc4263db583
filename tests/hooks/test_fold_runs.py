"""One nested MLflow run per cross-validation fold (hooks/fold_runs.py), through Kedro's runner
on a throw-away store: tags, parameters, metrics, curves and status of each fold's run."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline
from kedro.runner import SequentialRunner
from mlflow.tracking import MlflowClient

from cassava_pipeline.hooks.fold_runs import FoldRunsHooks
from cassava_pipeline.tracking import FOLD_TAG, EpochLogger
from tests.pipelines.conftest import hook_manager

STAGE = {"epochs": 2, "lr": 0.002, "loader": {"batch_size": 8}}


def _train(stage: dict, fold: str) -> pd.DataFrame:
    tracker = EpochLogger.for_active_run(offset=0, fold=fold)  # as the training node does
    for epoch in range(stage["epochs"]):
        tracker({"epoch": epoch, "accuracy": 0.5 + epoch / 10, "train_loss": 1.0})
    return pd.DataFrame({"epoch": range(stage["epochs"])})


def _score(history: pd.DataFrame, fail: bool) -> dict:
    if fail:
        raise RuntimeError("this fold fails")
    return {"accuracy": {"value": 0.75, "step": 0}, "tta_accuracy": {"value": 0.8, "step": 0}}


def _fold(k: int) -> Pipeline:
    return Pipeline(
        [
            Node(
                lambda s, f=f"fold_{k}": _train(s, f),
                "params:frozen.train",
                "history",
                name="train_stage",
            ),
            Node(_score, ["history", "params:fail"], "final_metrics", name="evaluate"),
        ],
        namespace=f"fold_{k}",
        parameters={"params:frozen.train", "params:fail"},
    )


def _run(fail: bool):
    manager = hook_manager(FoldRunsHooks())
    pipe = _fold(0) + _fold(1) + Pipeline([Node(len, "cv_folds", "n", name="out_of_fold")])
    catalog = DataCatalog(
        {
            "cv_folds": MemoryDataset([1, 2]),
            "params:frozen.train": MemoryDataset(STAGE),
            "params:fail": MemoryDataset(fail),
            "parameters": MemoryDataset({"cv": {"folds": 2, "seed": 7}}),
        }
    )
    run_params = {"pipeline_names": ["cassava_cv"]}
    with mlflow.start_run(tags={"git_commit": "abc", "data_hash": "d1", "host": "h"}) as parent:
        manager.hook.before_pipeline_run(run_params=run_params, pipeline=pipe, catalog=catalog)
        try:
            SequentialRunner().run(pipe, catalog, hook_manager=manager)
        except RuntimeError as e:
            manager.hook.on_pipeline_error(
                error=e, run_params=run_params, pipeline=pipe, catalog=catalog
            )
            raise
    client = MlflowClient()
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    return client, parent.info.run_id, {r.data.tags[FOLD_TAG]: r for r in children}


def test_each_fold_has_a_child_run_with_its_params_curves_and_metrics(store):
    client, parent, children = _run(fail=False)
    assert sorted(children) == ["fold_0", "fold_1"]
    for k, (fold, run) in enumerate(sorted(children.items())):
        assert run.info.status == "FINISHED"
        assert run.info.run_name.endswith(fold)
        tags = run.data.tags
        assert tags["git_commit"] == "abc" and tags["data_hash"] == "d1" and tags["host"] == "h"
        params = run.data.params
        assert params["cv.fold"] == str(k) and params["cv.folds"] == "2"
        assert params["frozen.train.epochs"] == "2"
        assert params["frozen.train.loader.batch_size"] == "8"
        assert run.data.metrics["final_metrics.tta_accuracy"] == 0.8
        curve = client.get_metric_history(run.info.run_id, "accuracy")  # its own names
        assert [(m.step, m.value) for m in curve] == [(0, 0.5), (1, 0.6)]
    top = client.get_run(parent)
    assert FOLD_TAG not in top.data.tags and "accuracy" not in top.data.metrics


def test_a_failed_pipeline_marks_the_open_fold_runs_failed(store):
    with pytest.raises(RuntimeError, match="this fold fails"):
        _run(fail=True)
    client = MlflowClient()
    runs = client.search_runs(
        [r.experiment_id for r in client.search_experiments()],
        filter_string=f"tags.`{FOLD_TAG}` = 'fold_0'",
    )
    assert [r.info.status for r in runs] == ["FAILED"]


def test_without_a_child_run_a_fold_logs_into_the_run_under_its_name(store):
    with mlflow.start_run() as run:
        tracker = EpochLogger.for_active_run(offset=0, fold="fold_3")
        assert tracker.run_id == run.info.run_id and tracker.prefix == "fold_3/"
