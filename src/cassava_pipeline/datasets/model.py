"""The exported, self-describing model file (safetensors with a model card)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from cassava_pipeline.vision.export import (
    ExportedEnsemble,
    ExportedModel,
    ExportError,
    load_model_file,
)

from .checkpoint import write_atomic_rank0

Model = ExportedModel | ExportedEnsemble


class ExportedModelDataset(AbstractDataset[Model, Model]):
    """Saves an :class:`ExportedModel` (or a fold :class:`ExportedEnsemble`) as one safetensors
    file, atomically; loads back whichever the file holds.

    Loading parses tensors and JSON only, never pickles.
    """

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Model:
        if not self._path.is_file():
            raise ExportError(
                f"No trained model at {self._path}. Models live apart per --env and data set "
                "(--params=data.raw=...): train one first with the same --env and data.raw "
                "(kedro run --pipelines=cassava ...; the fold ensemble: --pipelines=cassava_cv), "
                "then predict with those same options."
            )
        return load_model_file(self._path.read_bytes(), source=str(self._path))

    def save(self, data: Model) -> None:
        write_atomic_rank0(self._path, lambda fh: fh.write(data.to_bytes()))

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
