"""kedro-datasets' file datasets, written atomically: no reader ever sees half a file.

kedro-datasets write straight into the output's path, so a run killed mid-write (or a reader
racing a writer) meets a truncated JSON, CSV, Parquet or PNG. The classes here are those
datasets unchanged but for :meth:`AtomicWrites.save`: the data goes to a temporary sibling
named after the writing process (``.<name>.tmp-<pid><suffix>``: the suffix kept, since Pillow
and Matplotlib choose the format from it), which is synced and renamed into place. Temporaries
of dead writers are removed by the next writer and by the next run
(:mod:`cassava_pipeline.vision.atomic`). Remote filesystems (``s3://``, ...) are written as
kedro-datasets writes them: their object stores make a finished upload appear whole.

Use them in the catalog as ``cassava_pipeline.datasets.atomic.JSONDataset`` and so on.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from kedro_datasets.json import JSONDataset as _JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset as _MatplotlibDataset
from kedro_datasets.pandas import CSVDataset as _CSVDataset
from kedro_datasets.pandas import ParquetDataset as _ParquetDataset
from kedro_datasets.pillow import ImageDataset as _ImageDataset

from cassava_pipeline.vision.atomic import install, remove_dead_temps, temp_path, writing
from cassava_pipeline.vision.dist import on_rank_zero


class AtomicWrites:
    """Mixin for a kedro-datasets file dataset: ``save`` writes a temporary sibling, syncs it and
    renames it over the output."""

    _atomic_target: PurePosixPath | None = None

    def _get_save_path(self) -> PurePosixPath:
        return self._atomic_target or super()._get_save_path()  # type: ignore[misc]

    def save(self, data: Any) -> None:
        # Under torchrun rank 0 writes and the others wait until the file is in place.
        on_rank_zero(lambda: self._save_atomic(data))

    def _save_atomic(self, data: Any) -> None:
        parent_save = super().save  # type: ignore[misc]
        unwrapped = getattr(parent_save, "__wrapped__", None)  # Kedro's wrapper is around ours

        def write(d: Any) -> None:
            if unwrapped is None:
                parent_save(d)
            else:
                unwrapped(self, d)

        figures = isinstance(self, _MatplotlibDataset) and isinstance(data, list | dict)
        if getattr(self, "_protocol", "file") != "file" or figures:
            write(data)  # an object store, or Matplotlib's folder of figures: written as is
            return
        final = Path(str(super()._get_save_path()))  # type: ignore[misc]
        tmp = temp_path(final, os.getpid(), keep_suffix=True)
        self._atomic_target = PurePosixPath(tmp.as_posix())
        try:
            with writing(final, tmp):  # a read-only or full disk: one message, nothing left
                final.parent.mkdir(parents=True, exist_ok=True)
                remove_dead_temps(final)
                write(data)
                install(tmp, final)
        finally:
            self._atomic_target = None
        self._invalidate_cache()  # type: ignore[attr-defined]

    _save = save  # Kedro makes ``_save`` the dataset's save when a class defines it


class JSONDataset(AtomicWrites, _JSONDataset):
    """``json.JSONDataset``, written atomically."""


class CSVDataset(AtomicWrites, _CSVDataset):
    """``pandas.CSVDataset``, written atomically."""


class ParquetDataset(AtomicWrites, _ParquetDataset):
    """``pandas.ParquetDataset``, written atomically."""


class MatplotlibDataset(AtomicWrites, _MatplotlibDataset):
    """``matplotlib.MatplotlibDataset``: one figure written atomically (a list or dict of figures,
    saved as a folder, is written as kedro-datasets writes it)."""


class ImageDataset(AtomicWrites, _ImageDataset):
    """``pillow.ImageDataset``, written atomically."""
