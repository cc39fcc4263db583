"""A file dataset whose file is also an artifact of the active MLflow run.

kedro-mlflow's ``MlflowArtifactDataset`` subclasses the dataset it wraps at run time and calls
its save through Kedro's wrapper, which the atomic datasets (:mod:`.atomic`) replace; this one
holds the file dataset and logs its file after the save, the same work in plain composition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from kedro.io import AbstractDataset, DatasetError


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
        mlflow.log_artifact(str(self._local_path()), self._artifact_path)

    def _exists(self) -> bool:
        return self._dataset.exists()

    def _describe(self) -> dict[str, Any]:
        return {"dataset": self._dataset._describe(), "artifact_path": self._artifact_path}
