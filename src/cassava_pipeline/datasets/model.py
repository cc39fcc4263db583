"""The exported, self-describing model file (safetensors with a model card)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from cassava_pipeline.vision.export import ExportedModel


class ExportedModelDataset(AbstractDataset[ExportedModel, ExportedModel]):
    """Saves an :class:`ExportedModel` as one safetensors file, atomically; loads it back.

    Loading parses tensors and JSON only, never pickles.
    """

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> ExportedModel:
        return ExportedModel.from_bytes(self._path.read_bytes(), source=str(self._path))

    def save(self, data: ExportedModel) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun every rank runs the node; rank 0 writes
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f".{self._path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(data.to_bytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
