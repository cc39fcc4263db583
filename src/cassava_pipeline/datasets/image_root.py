"""A read-only dataset whose value is the folder holding a data set's raw images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError


class ImageRootDataset(AbstractDataset[None, Path]):
    """Loads as the absolute path of a raw image folder (Kaggle's layout, a folder per class...).

    The images stay where the user put them (DVC tracks them there); ingest reads them through
    this path, in parallel worker processes, which a dataset returning file contents could not
    feed efficiently.
    """

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    @property
    def path(self) -> Path:
        """The folder as configured (unresolved)."""
        return self._path

    def load(self) -> Path:
        return self._path.expanduser().resolve()

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._path} is raw input: ImageRootDataset is read-only")

    def _exists(self) -> bool:
        return self._path.expanduser().is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
