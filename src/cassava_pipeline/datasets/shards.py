"""A dataset of presized images stored as shard files (see ``vision.presize``)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from cassava_pipeline.vision.atomic import (
    install,
    remove_dead_temps,
    remove_path,
    temp_path,
    writing,
)
from cassava_pipeline.vision.dist import on_rank_zero
from cassava_pipeline.vision.integrity import display_path
from cassava_pipeline.vision.kept import KEPT_FOLDER, KeepPolicy, Kept
from cassava_pipeline.vision.presize import META_FILE, PresizeJob, job_inputs, write_shards
from cassava_pipeline.vision.provenance import digest
from cassava_pipeline.vision.shards import ShardedImages, read_meta, stale_reason

logger = logging.getLogger(__name__)


class ImageShardsDataset(AbstractDataset[PresizeJob, ShardedImages]):
    """Saves a :class:`PresizeJob` by running it into ``path``; loads a :class:`ShardedImages`.

    The shards are written into a temporary sibling folder that replaces ``path`` only once
    complete, so an interrupted presize never leaves a half-written set behind. A set already
    at ``path`` that was written from the same inputs (images by content, split, labels,
    settings, code, packages) and whose files all match their recorded sha256 is kept as it is:
    the same inputs give byte-identical shards, so a rerun with nothing changed costs a hash
    of the shards instead of a presize (minutes at Kaggle's size).
    """

    def __init__(
        self,
        *,
        path: str,
        keep: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        self._path = Path(path)
        # earlier sets kept for reuse when their settings come back (vision/kept.py)
        self._keep = KeepPolicy(**(keep or {"entries": 2, "max_gib": 16.0}))
        self.metadata = metadata

    def load(self) -> ShardedImages:
        return ShardedImages(self._path)

    def save(self, data: PresizeJob) -> None:
        # Under torchrun rank 0 presizes (the job runs here, in save) and the others wait.
        on_rank_zero(lambda: self._write(data))

    def _write(self, data: PresizeJob) -> None:
        with writing(self._path):
            self._path.parent.mkdir(parents=True, exist_ok=True)
            remove_dead_temps(self._path)  # a presize killed mid-way (kill -9) left its folder
        where = display_path(self._path)
        reason = stale_reason(self._path, data)
        if reason is None:
            logger.info(
                "presize %d: %s holds these images presized with these settings and code "
                "(every shard verified); kept as it is",
                data.options.size,
                where,
            )
            return
        kept = Kept(self._path.parent / KEPT_FOLDER / self._path.name, self._keep)
        if self._bring_back(kept, data):
            return
        logger.info("presize %d into %s: %s", data.options.size, where, reason)
        twin = self._twin(data)
        if twin is not None:  # e.g. small and large at the same size: linked, not written twice
            logger.info(
                "presize %d: %s holds the same shards (verified); linking them, not presizing",
                data.options.size,
                display_path(twin),
            )
        tmp = temp_path(self._path, os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(self._path, tmp):  # a read-only or full disk: one message, nothing left
            if twin is not None:
                _link_tree(twin, tmp)
            else:
                write_shards(data, tmp)
            previous = self._swap_in(tmp)
        if previous is not None:
            self._keep_aside(kept, previous)

    def _swap_in(self, folder: Path) -> Path | None:
        """``folder`` becomes ``path``; the set it replaces is moved aside (and returned), or
        put back where it was if the swap fails."""
        old = temp_path(self._path, os.getpid(), "old")
        return old if install(folder, self._path, previous=old) else None

    def _keep_aside(self, kept: Kept, folder: Path) -> None:
        """An earlier, complete set into the kept folder under its inputs' digest (removed when
        it has no record of its inputs, or the policy keeps none)."""
        try:
            inputs = read_meta(folder).get("inputs")
        except Exception:  # damaged or foreign: not worth keeping
            inputs = None
        where = kept.store(folder, digest(inputs)) if isinstance(inputs, dict) else None
        if where is None:
            remove_path(folder)
        else:
            logger.info("presize: the previous set is kept as %s", display_path(where))

    def _bring_back(self, kept: Kept, data: PresizeJob) -> bool:
        """Put back a set kept from these same inputs, verified; False when there is none."""
        entry = kept.take(digest(job_inputs(data)))
        if entry is None:
            return False
        problem = stale_reason(entry, data)
        if problem is not None:  # damaged while kept: presized again
            logger.warning("presize: %s is not usable (%s); removed", display_path(entry), problem)
            shutil.rmtree(entry, ignore_errors=True)
            return False
        with writing(self._path):
            previous = self._swap_in(entry)
        logger.info(
            "presize %d: %s holds these images presized from these same inputs (kept when "
            "they last changed; every shard verified); back in place, not presizing",
            data.options.size,
            display_path(entry),
        )
        if previous is not None:
            self._keep_aside(kept, previous)
        return True

    def _twin(self, data: PresizeJob) -> Path | None:
        """A sibling shard folder written from the same inputs, verified, if there is one."""
        if not self._path.parent.is_dir():
            return None
        for sibling in sorted(self._path.parent.iterdir()):
            if (
                sibling != self._path
                and not sibling.name.startswith(".")  # a temporary folder being written
                and (sibling / META_FILE).is_file()
                and stale_reason(sibling, data) is None
            ):
                return sibling
        return None

    def _exists(self) -> bool:
        return (self._path / META_FILE).exists()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` with the files of ``src``: hard links (no bytes copied) where the file system
    allows, copies otherwise. Shard files are never written in place, so sharing them is safe."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
