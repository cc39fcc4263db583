"""A dataset of presized images stored as shard files (see ``vision.presize``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from cassava_pipeline.vision.atomic import remove_dead_temps, temp_path
from cassava_pipeline.vision.dist import on_rank_zero
from cassava_pipeline.vision.presize import META_FILE, PresizeJob, write_shards
from cassava_pipeline.vision.shards import ShardedImages


class ImageShardsDataset(AbstractDataset[PresizeJob, ShardedImages]):
    """Saves a :class:`PresizeJob` by running it into ``path``; loads a :class:`ShardedImages`.

    The shards are written into a temporary sibling folder that replaces ``path`` only once
    complete, so an interrupted presize never leaves a half-written set behind.
    """

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> ShardedImages:
        return ShardedImages(self._path)

    def save(self, data: PresizeJob) -> None:
        # Under torchrun rank 0 presizes (the job runs here, in save) and the others wait.
        on_rank_zero(lambda: self._write(data))

    def _write(self, data: PresizeJob) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(self._path)  # a presize killed mid-way (kill -9) left its folder
        tmp = temp_path(self._path, os.getpid())
        old = temp_path(self._path, os.getpid(), "old")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_shards(data, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self._path.exists():
            self._path.rename(old)
        tmp.rename(self._path)
        shutil.rmtree(old, ignore_errors=True)

    def _exists(self) -> bool:
        return (self._path / META_FILE).exists()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
