"""Random access to presized images stored in shard files (see :mod:`.presize`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .presize import INDEX_FILE, META_FILE, SHARD_FORMAT


class ShardedImages:
    """A map-style dataset over a shard directory: ``ds[i]`` is (HxWx3 uint8 array, label).

    Shards are memory-mapped lazily in each process (DataLoader workers included), so opening
    is cheap and the page cache is shared between workers. Raw items are zero-copy read-only
    views; JPEG items are decoded with PIL (torchvision's decode_jpeg is deprecated in 0.29).
    """

    def __init__(self, directory: str | Path, indices: np.ndarray | None = None):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{self.directory} holds no presized images ({META_FILE} is missing); "
                "run the presize nodes first: kedro run --pipeline=cassava"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != SHARD_FORMAT:
            raise ValueError(
                f"{meta_path} is format {self.meta.get('format')!r}, expected {SHARD_FORMAT!r}; "
                "rerun presize"
            )
        full = pd.read_parquet(self.directory / INDEX_FILE)
        self._full_index = full
        self._rows = (
            np.arange(len(full)) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        self._shard = full["shard"].to_numpy()
        self._offset = full["offset"].to_numpy()
        self._nbytes = full["nbytes"].to_numpy()
        self._jpeg = self.meta.get("encoding", "raw") == "jpeg"
        self._h = full["out_height"].to_numpy()
        self._w = full["out_width"].to_numpy()
        self._label = full["label"].to_numpy()
        self._maps: dict[int, np.memmap] = {}

    @property
    def size(self) -> int:
        """The presize: shorter side of every stored image."""
        return int(self.meta["size"])

    @property
    def content(self) -> dict[str, str]:
        """The content digests written with the shards (:func:`.presize.content_digests`)."""
        return dict(self.meta["content"])

    @property
    def classes(self) -> list[str]:
        """Class names in label order."""
        return list(self.meta["classes"])

    @property
    def index(self) -> pd.DataFrame:
        """Index rows (path, label, is_valid, size, shard, offset, ...) of this view."""
        return self._full_index.iloc[self._rows].reset_index(drop=True)

    @property
    def labels(self) -> np.ndarray:
        """Labels of this view, in order."""
        return self._label[self._rows]

    def split(self) -> tuple[ShardedImages, ShardedImages]:
        """(training view, validation view), from the manifest's ``is_valid`` column."""
        valid = self._full_index["is_valid"].to_numpy(dtype=bool)[self._rows]
        return self.subset(np.flatnonzero(~valid)), self.subset(np.flatnonzero(valid))

    def subset(self, positions: np.ndarray) -> ShardedImages:
        """A view over some positions of this view (no data is copied)."""
        view = object.__new__(ShardedImages)
        view.__dict__.update(self.__dict__)
        view._rows = self._rows[np.asarray(positions, dtype=np.int64)]
        view._maps = {}
        return view

    def __len__(self) -> int:
        return len(self._rows)

    def _map(self, shard: int) -> np.memmap:
        m = self._maps.get(shard)
        if m is None:
            m = np.memmap(self.directory / f"shard-{shard:05d}.bin", dtype=np.uint8, mode="r")
            self._maps[shard] = m
        return m

    def image(self, i: int) -> np.ndarray:
        """The i-th image of this view as a read-only HxWx3 uint8 array."""
        r = self._rows[i]
        off, n = int(self._offset[r]), int(self._nbytes[r])
        data = self._map(int(self._shard[r]))[off : off + n]
        if self._jpeg:
            with Image.open(io.BytesIO(data.tobytes())) as im:
                return np.asarray(im.convert("RGB"))
        return data.reshape(int(self._h[r]), int(self._w[r]), 3)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        return self.image(i), int(self._label[self._rows[i]])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are reopened in each worker process
        return state
