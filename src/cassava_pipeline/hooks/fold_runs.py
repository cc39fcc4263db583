"""One nested MLflow run per cross-validation fold, under the run of ``kedro run``.

kedro-mlflow makes one run per ``kedro run``: for ``cassava_cv`` that run is the parent and
holds what the folds show together (out-of-fold accuracy, its interval, the label issues and
their figure). A fold's nodes (Kedro namespace ``fold_<k>``) open the fold's child run the
first time one of them runs: tagged ``mlflow.parentRunId`` (the MLflow UI lists it under its
parent), ``cv_fold`` and the parent's provenance tags; its parameters are the ones the fold's
nodes read, and ``cv.fold``; its curves are logged by the training stages
(:meth:`cassava_pipeline.tracking.EpochLogger.for_active_run` finds it), its metrics are the
fold's evaluation (``final_metrics.*``, the names a single-split run uses, so a fold and a
single run compare in one table). The child ends FINISHED with the fold's last node, FAILED
when the pipeline fails first. Under a tracking server the run is mirrored to, each child is
sent when it ends. Tracking never fails the run: a child that cannot be made gets one warning
and the fold logs into the parent, under ``fold_<k>/`` names.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kedro.framework.hooks import hook_impl
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from cassava_pipeline.dvc_runs import PARENT_TAG, flatten
from cassava_pipeline.fallback import active_mirror, sync
from cassava_pipeline.tracking import FOLD_TAG, active_run_id
from cassava_pipeline.vision.dist import rank
from cassava_pipeline.vision.folds import fold_name, fold_number

logger = logging.getLogger(__name__)

# the parent's tags a child copies: provenance, and what marks a run left RUNNING by a dead
# process (mark_dead_runs_killed) or waiting for a tracking server (fallback)
_NOT_COPIED = ("mlflow.", "dvc.", "final_stage", "skipped_stages")


def fold_of(node: Any) -> str | None:
    """The fold a node belongs to (``fold_2`` for ``fold_2.frozen.train_stage``), or None."""
    k = fold_number(getattr(node, "namespace", None))
    return None if k is None else fold_name(k)


class FoldRunsHooks:
    """See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # ThreadRunner calls hooks from its threads
        self._parent: str | None = None
        self._runs: dict[str, str] = {}  # fold -> its child run
        self._remaining: dict[str, set[str]] = {}  # fold -> its nodes not finished yet
        self._logged: dict[str, set[str]] = {}  # fold -> parameter names logged
        self._cv: dict[str, Any] = {}

    @hook_impl(trylast=True)  # after kedro-mlflow started the parent run
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        with self._lock:
            self._parent = active_run_id() if rank() == 0 else None
            self._runs, self._logged, self._remaining = {}, {}, {}
            for node in pipeline.nodes:
                fold = fold_of(node)
                if fold is not None:
                    self._remaining.setdefault(fold, set()).add(node.name)
            try:
                self._cv = dict(catalog.load("parameters").get("cv") or {})
            except Exception:  # a catalog without parameters (tests)
                self._cv = {}

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        fold = fold_of(node)
        if fold is None or self._parent is None:
            return
        with self._lock:
            run_id = self._runs[fold] if fold in self._runs else self._open(fold)
            if not run_id:  # "": it could not be made (said once)
                return
            params = {
                k.removeprefix("params:"): v for k, v in inputs.items() if k.startswith("params:")
            }
            self._record_params(fold, run_id, flatten(params))

    def _open(self, fold: str) -> str | None:
        client = MlflowClient()
        try:
            parent = client.get_run(self._parent)
            tags = {k: v for k, v in parent.data.tags.items() if not k.startswith(_NOT_COPIED)}
            tags.update(
                {
                    PARENT_TAG: self._parent,
                    FOLD_TAG: fold,
                    "mlflow.runName": f"{parent.info.run_name or 'cv'} {fold}",
                }
            )
            run_id = client.create_run(parent.info.experiment_id, tags=tags).info.run_id
        except Exception as e:  # grouping is for reading the table: never fail a run for it
            logger.warning("%s: no MLflow run of its own (%s); it logs into the run", fold, e)
            self._runs[fold] = ""
            return None
        self._runs[fold] = run_id
        self._logged[fold] = set()
        cv = flatten(self._cv, "cv.")
        cv["cv.fold"] = str(fold_number(fold))
        self._record_params(fold, run_id, cv)
        return run_id

    def _record_params(self, fold: str, run_id: str, params: dict[str, str]) -> None:
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in self._logged[fold]]
        try:
            for i in range(0, len(new), 100):
                MlflowClient().log_batch(run_id, params=new[i : i + 100])
        except Exception as e:
            logger.warning("%s: its MLflow run did not get its parameters: %s", fold, e)
        self._logged[fold].update(p.key for p in new)

    @hook_impl
    def after_node_run(self, node, catalog, inputs, outputs, is_async: bool) -> None:
        fold = fold_of(node)
        if fold is None:
            return
        run_id = self._runs.get(fold)
        data = outputs.get(f"{fold}.final_metrics")
        if run_id and isinstance(data, dict):  # the fold's evaluation (outputs are saved later)
            metrics = [
                Metric(f"final_metrics.{name}", float(v["value"]), 0, int(v.get("step") or 0))
                for name, v in data.items()
            ]
            try:
                MlflowClient().log_batch(run_id, metrics=metrics)
            except Exception as e:
                logger.warning("%s: its MLflow run did not get its metrics: %s", fold, e)
        with self._lock:
            remaining = self._remaining.get(fold, set())
            remaining.discard(node.name)
            if not remaining and self._runs.get(fold):
                self._close(fold, "FINISHED")

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        with self._lock:
            for fold, run_id in list(self._runs.items()):
                if run_id:
                    self._close(fold, "FAILED")

    def _close(self, fold: str, status: str) -> None:
        run_id = self._runs.pop(fold)
        client = MlflowClient()
        try:
            client.set_terminated(run_id, status=status)
        except Exception as e:
            logger.warning("%s: its MLflow run could not be ended %s: %s", fold, status, e)
            return
        mirror = active_mirror()
        if mirror is not None and mirror.gone is None:  # sent now, as its parent is
            try:
                sync(mirror.local_uri, mirror.server_uri, client.get_run(run_id), final=True)
            except Exception as e:
                logger.warning(
                    "%s: its MLflow run waits for the server (%s); python -m "
                    "cassava_pipeline.fallback sync sends it",
                    fold,
                    e,
                )
