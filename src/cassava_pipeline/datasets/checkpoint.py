"""Checkpoints (dicts of tensors and plain values) and working folders for resumable stages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from kedro.io import AbstractDataset

from cassava_pipeline.vision.atomic import write_atomic
from cassava_pipeline.vision.dist import on_rank_zero
from cassava_pipeline.vision.integrity import load_checkpoint, save_checkpoint


def write_atomic_rank0(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """:func:`~cassava_pipeline.vision.atomic.write_atomic` on rank 0 only (under torchrun
    every rank runs the node), then a barrier: when any rank goes on, the file is whole and in
    place for it to read."""
    on_rank_zero(lambda: write_atomic(path, write))


class CheckpointDataset(AbstractDataset[dict, dict]):
    """A ``torch.save``d dict with the sha256 of its content, written atomically, verified and
    loaded with ``weights_only=True`` (:mod:`cassava_pipeline.vision.integrity`).

    A damaged, truncated or foreign file (one holding pickled objects) is refused with an error
    naming it and the pipeline that writes it again.
    """

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> dict:
        return load_checkpoint(
            self._path,
            todo="Delete it and write it again: kedro run --pipelines=train (or dvc repro train)",
        )

    def save(self, data: dict) -> None:
        write_atomic_rank0(self._path, lambda fh: save_checkpoint(data, fh))

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class WorkDirDataset(AbstractDataset[None, Path]):
    """Loads as a folder (created if needed) where a node keeps state between runs.

    The training stages keep their per-epoch resume checkpoints there, so a stage killed
    mid-way resumes on the next ``kedro run``.
    """

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Path:
        self._path.mkdir(parents=True, exist_ok=True)
        return self._path.resolve()

    def save(self, data: None) -> None:  # pragma: no cover - never an output
        raise NotImplementedError("WorkDirDataset is an input only")

    def _exists(self) -> bool:
        return True

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
