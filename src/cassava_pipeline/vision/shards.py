"""Random access to presized images stored in shard files (see :mod:`.presize`).

A shard set is verified when first opened in a process: ``meta.json`` against its own sha256,
the index and every shard file against the size and sha256 recorded when they were written.
A file that fails is never read; the error names it and says to presize again.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .integrity import DIGEST_KEY, IntegrityError, content_sha256, verified_file_sha256
from .presize import INDEX_FILE, INPUT_PARTS, META_FILE, SHARD_FORMAT, PresizeJob, job_inputs
from .provenance import digest

PRESIZE_AGAIN = (
    "Presize again: kedro run --pipelines=data (or dvc repro data) rewrites the shard set from "
    "the raw images"
)
# Files this process has verified, by identity (path, inode, size, mtime): each is hashed once
# per process whatever the number of loads, and forked DataLoader workers inherit the set.
_VERIFIED: set[tuple] = set()


def _identity(path: Path, expected: str) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, expected)


def _verify_file(path: Path, expected: str, size: int | None) -> None:
    try:
        key = _identity(path, expected)
    except FileNotFoundError:
        raise IntegrityError(path, "the file is missing", PRESIZE_AGAIN) from None
    if key not in _VERIFIED:
        verified_file_sha256(path, expected, size, PRESIZE_AGAIN)
        _VERIFIED.add(key)


def read_meta(directory: Path) -> dict:
    """A shard set's ``meta.json``, checked against the sha256 it carries."""
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(meta_path, f"it is not readable JSON ({e})", PRESIZE_AGAIN) from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise IntegrityError(
            meta_path, f"it is format {found!r}, expected {SHARD_FORMAT!r}", PRESIZE_AGAIN
        )
    expected = meta.pop(DIGEST_KEY, None)
    actual = content_sha256(meta)
    if actual != expected:
        raise IntegrityError(
            meta_path,
            f"its content does not match its sha256 (recorded {expected}, now {actual})",
            PRESIZE_AGAIN,
        )
    return meta


def verify_shards(directory: Path, meta: dict) -> None:
    """Check the index and every shard file against ``meta`` (once per process and file)."""
    _verify_file(directory / INDEX_FILE, meta["index_sha256"], None)
    for shard in meta["shards"]:
        _verify_file(directory / shard["file"], shard["sha256"], int(shard["bytes"]))


def stale_reason(directory: Path, job: PresizeJob) -> str | None:
    """None when ``directory`` holds the shards ``job`` would write, verified: the same inputs
    (:func:`.presize.job_inputs`) and every file equal to the sha256 recorded when it was
    written. Otherwise why it must be written (again), in words."""
    directory = Path(directory)
    if not (directory / META_FILE).exists():
        return "nothing presized yet"
    try:
        meta = read_meta(directory)
    except IntegrityError as e:
        return f"{META_FILE} failed its check ({e.problem})"
    saved = meta.get("inputs")
    if not isinstance(saved, dict):
        return "written by an older version (no record of its inputs)"
    current = job_inputs(job)
    changed = [INPUT_PARTS.get(k, k) for k in current if saved.get(k) != current[k]]
    if changed:
        return ", ".join(changed)
    try:
        verify_shards(directory, meta)
    except IntegrityError as e:
        return f"{Path(e.path).name} failed its check ({e.problem})"
    return None


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
                "run the presize nodes first: kedro run --pipelines=cassava"
            )
        self.meta = read_meta(self.directory)
        verify_shards(self.directory, self.meta)
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
        self._valid = full["is_valid"].to_numpy(dtype=bool)  # per row of the full index
        self._content = dict(self.meta["content"])
        self.split_name = ""  # the name of a resplit view (a CV fold), for logs and metrics
        self._maps: dict[int, np.memmap] = {}

    @property
    def size(self) -> int:
        """The presize: shorter side of every stored image."""
        return int(self.meta["size"])

    @property
    def content(self) -> dict[str, str]:
        """The content digests written with the shards (:func:`.presize.content_digests`); for
        a :meth:`resplit` view, with its own ``split`` (and so ``digest``)."""
        return dict(self._content)

    @property
    def classes(self) -> list[str]:
        """Class names in label order."""
        return list(self.meta["classes"])

    @property
    def index(self) -> pd.DataFrame:
        """Index rows (path, label, is_valid, size, shard, offset, ...) of this view."""
        rows = self._full_index.iloc[self._rows].reset_index(drop=True)
        rows["is_valid"] = self._valid[self._rows]  # a resplit view's own sides
        rows["label"] = self._label[self._rows]  # and labels
        return rows

    @property
    def labels(self) -> np.ndarray:
        """Labels of this view, in order."""
        return self._label[self._rows]

    def split(self) -> tuple[ShardedImages, ShardedImages]:
        """(training view, validation view), from the manifest's ``is_valid`` column (or the
        flags given to :meth:`resplit`)."""
        valid = self._valid[self._rows]
        return self.subset(np.flatnonzero(~valid)), self.subset(np.flatnonzero(valid))

    def resplit(
        self, valid: np.ndarray, name: str = "", labels: np.ndarray | None = None
    ) -> ShardedImages:
        """This view with ``valid`` (one flag per image of it) as its validation side, e.g. a
        cross-validation fold, called ``name``; ``labels`` (one per image) replace the labels
        (revised labels). Its content's ``split`` part digests exactly these images, flags and
        labels, so a model trained on one fold is never taken for another's."""
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (len(self),):
            raise ValueError(f"resplit needs one flag per image ({len(self)}), got {valid.shape}")
        view = self.subset(np.arange(len(self)))
        view._valid = self._valid.copy()
        view._valid[self._rows] = valid
        paths = self._full_index["path"].to_numpy()[self._rows].astype(str).tolist()
        parts = {k: v for k, v in self._content.items() if k != "digest"}
        parts["split"] = digest([paths, valid.tolist()])
        if labels is not None:
            labels = np.asarray(labels, dtype=self._label.dtype)
            outside = (labels < 0) | (labels >= len(self.classes))
            if labels.shape != (len(self),) or outside.any():
                raise ValueError(f"resplit needs one label of 0..{len(self.classes) - 1} per image")
            view._label = self._label.copy()
            view._label[self._rows] = labels
            parts["split"] = digest([paths, valid.tolist(), labels.tolist()])
        view._content = {**parts, "digest": digest(parts)}
        view.split_name = name
        return view

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
