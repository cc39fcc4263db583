"""Presize: decode each image once, orient it, convert it to RGB and resize its shorter side.

fastai presizes with ``Resize(460)`` as an item transform so that the batch augmentations have
room to crop and rotate; here the result is computed once and stored, so the training stages
never decode a JPEG. The output is a few large *shard* files of raw uint8 HxWx3 pixels plus an
index; :class:`~cassava_pipeline.vision.shards.ShardedImages` reads any image by random access.

Every output size is known from the manifest before decoding, so each image's byte offset is
fixed up front: the worker processes write straight into preallocated shard files
(``os.pwrite``), nothing but file names crosses process boundaries, memory stays flat whatever
the data set's size, and the output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.transforms.v2 import functional as TF

from .images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb, read_bytes
from .parallel import chunked, ordered_map, resolve_workers

SHARD_FORMAT = "cassava-pipeline/shards-v1"
INDEX_FILE = "index.parquet"
META_FILE = "meta.json"


class PresizeError(RuntimeError):
    """An image could not be presized (it changed or vanished after ingest)."""


@dataclass(frozen=True)
class PresizeOptions:
    """How to presize."""

    size: int = 460  # fastai's Resize(460) in the seeds: shorter side after presizing
    workers: int = 0  # processes; 0 = all cores
    shard_mb: int = 1024  # a shard file is at most this large (MiB), unless one image is larger
    chunk_size: int = 32  # images per task sent to a worker
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # same bomb limit as ingest
    jpeg_draft: bool = True  # decode JPEGs >= 2x the target at 1/2, 1/4 or 1/8 scale (DCT scaling)


@dataclass(frozen=True)
class PresizeJob:
    """Everything needed to write a shard set: source root, manifest rows, classes, options."""

    root: str
    manifest: pd.DataFrame
    classes: tuple[str, ...]
    options: PresizeOptions


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side equal to ``size``, aspect ratio kept."""
    if width <= height:
        return size, max(1, round(height * size / width))
    return max(1, round(width * size / height)), size


def resize_shorter(image: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Resize an HxWx3 uint8 array with antialiased bilinear filtering (PIL's BILINEAR).

    torch's uint8 antialiased kernel gives PIL's result (to within 1 level) several times faster
    than Pillow's own resize.
    """
    h, w = image.shape[:2]
    if (h, w) == (out_h, out_w):
        return np.ascontiguousarray(image)
    with warnings.catch_warnings():
        # PIL's arrays are read-only; the resize only reads them, so no copy is needed.
        warnings.simplefilter("ignore", UserWarning)
        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    out = TF.resize(
        chw, [out_h, out_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True
    )
    return out.permute(1, 2, 0).contiguous().numpy()


def plan_layout(manifest: pd.DataFrame, options: PresizeOptions) -> pd.DataFrame:
    """Add out_width, out_height, shard and offset columns: where each image will be stored."""
    sizes = [
        target_size(w, h, options.size)
        for w, h in zip(manifest["width"], manifest["height"], strict=True)
    ]
    out = manifest.reset_index(drop=True).copy()
    out["out_width"] = np.array([s[0] for s in sizes], dtype=np.int64)
    out["out_height"] = np.array([s[1] for s in sizes], dtype=np.int64)
    nbytes = (out["out_width"] * out["out_height"] * 3).to_numpy()
    limit = options.shard_mb * 2**20
    shard = np.zeros(len(out), dtype=np.int64)
    offset = np.zeros(len(out), dtype=np.int64)
    cur_shard, cur_off = 0, 0
    for i, n in enumerate(nbytes):
        if cur_off and cur_off + n > limit:
            cur_shard, cur_off = cur_shard + 1, 0
        shard[i], offset[i] = cur_shard, cur_off
        cur_off += int(n)
    out["shard"] = shard
    out["offset"] = offset
    return out


def shard_name(i: int) -> str:
    """File name of shard ``i``."""
    return f"shard-{i:05d}.bin"


def _write_chunk(args: tuple[str, str, Sequence[tuple], int, int, bool]) -> list[tuple[str, str]]:
    root, out_dir, rows, size, max_pixels, draft = args
    errors: list[tuple[str, str]] = []
    fds: dict[int, int] = {}
    try:
        for rel, shard, offset, out_w, out_h, src_w, src_h in rows:
            try:
                data = read_bytes(os.path.join(root, rel))
                img = decode_rgb(data, max_pixels=max_pixels, min_side=size if draft else None)
            except ImageError as e:
                errors.append((rel, f"{e.reason}: {e.detail}"))
                continue
            h, w = img.shape[:2]
            # Same orientation and aspect as at ingest (DCT scaling may shrink it exactly 2^k x).
            if abs(h * src_w - w * src_h) > 8 * max(src_w, src_h) or (h > w) != (src_h > src_w):
                errors.append(
                    (rel, f"is {w}x{h} now but was {src_w}x{src_h} at ingest: the file changed")
                )
                continue
            out = resize_shorter(img, out_w, out_h)
            if shard not in fds:
                fds[shard] = os.open(os.path.join(out_dir, shard_name(shard)), os.O_WRONLY)
            os.pwrite(fds[shard], memoryview(out).cast("B"), offset)
    finally:
        for fd in fds.values():
            os.close(fd)
    return errors


def write_shards(job: PresizeJob, out_dir: Path) -> pd.DataFrame:
    """Presize every image of ``job`` into shard files under ``out_dir`` (which must be empty)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = job.options
    index = plan_layout(job.manifest, opts)
    nbytes = index["out_width"] * index["out_height"] * 3
    shard_sizes = (index["offset"] + nbytes).groupby(index["shard"]).max()
    for shard, total in shard_sizes.items():
        with open(out_dir / shard_name(int(shard)), "wb") as f:
            f.truncate(int(total))  # preallocate: workers write at fixed offsets
    rows = list(
        zip(
            index["path"],
            index["shard"].tolist(),
            index["offset"].tolist(),
            index["out_width"].tolist(),
            index["out_height"].tolist(),
            index["width"].tolist(),
            index["height"].tolist(),
            strict=True,
        )
    )
    workers = resolve_workers(opts.workers)
    if len(rows) < 2 * opts.chunk_size:
        workers = 1
    tasks = [
        (job.root, str(out_dir), c, opts.size, opts.max_image_pixels, opts.jpeg_draft)
        for c in chunked(rows, opts.chunk_size)
    ]
    errors = [e for errs in ordered_map(_write_chunk, tasks, workers=workers) for e in errs]
    if errors:
        shown = "; ".join(f"{p}: {r}" for p, r in errors[:10])
        raise PresizeError(
            f"{len(errors)} image(s) could not be presized although ingest accepted them: "
            f"{shown}. The raw data changed after ingest; rerun the pipeline from ingest."
        )
    index.to_parquet(out_dir / INDEX_FILE, index=False)
    meta = {
        "format": SHARD_FORMAT,
        "size": opts.size,
        "dtype": "uint8",
        "layout": "HWC",
        "classes": list(job.classes),
        "n_images": len(index),
        "shards": [{"file": shard_name(int(s)), "bytes": int(b)} for s, b in shard_sizes.items()],
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return index
