"""Datasets that also log to the active MLflow run, through the tracking failover.

kedro-mlflow's ``MlflowArtifactDataset`` and ``MlflowMetricsHistoryDataset`` fail the node
when the tracking server stops answering during their upload: the file is written, the run is
lost. These do the same work, but their MLflow calls go through
:func:`cassava_pipeline.fallback.guarded`: if the server is gone, the run moves to the local
store and the call is made again there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from kedro.io import AbstractDataset, DatasetError
from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset as _MetricsHistory

from cassava_pipeline.fallback import guarded


class MlflowArtifactDataset(AbstractDataset[Any, Any]):
    """A file dataset (``dataset``: its catalog entry) whose file, once saved, is also logged as
    an artifact of the active MLflow run under ``artifact_path``. Without an active run
    (tracking disabled for the pipeline) it is a plain file dataset."""

    def __init__(
        self,
        *,
        dataset: dict[str, Any],
        artifact_path: str | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        self._dataset = AbstractDataset.from_config("file", dict(dataset))
        self._artifact_path = artifact_path
        self._logging_activated = True  # kedro-mlflow switches it off where it records nothing
        self.metadata = metadata

    def _local_path(self) -> Path:
        path = getattr(self._dataset, "_filepath", None)
        if path is None:
            raise DatasetError(f"{self._dataset} has no file to log as an MLflow artifact")
        return Path(str(path))

    def load(self) -> Any:
        return self._dataset.load()

    def save(self, data: Any) -> None:
        self._dataset.save(data)
        if not self._logging_activated or mlflow.active_run() is None:
            return
        path = self._local_path()
        guarded(lambda: mlflow.log_artifact(str(path), self._artifact_path), f"logging {path.name}")

    def _exists(self) -> bool:
        return self._dataset.exists()

    def _describe(self) -> dict[str, Any]:
        return {"dataset": self._dataset._describe(), "artifact_path": self._artifact_path}


class MlflowMetricsHistoryDataset(_MetricsHistory):
    """kedro-mlflow's metrics dataset (named after its catalog entry, step histories), logged
    through the failover."""

    def _save(self, data: Any) -> None:
        guarded(lambda: super(MlflowMetricsHistoryDataset, self)._save(data), "logging metrics")
