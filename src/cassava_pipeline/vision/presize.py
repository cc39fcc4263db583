"""Presize: decode each image once, orient it, convert it to RGB and resize its shorter side.

fastai presizes with ``Resize(460)`` as an item transform so that the batch augmentations have
room to crop and rotate; here the result is computed once and stored. The output is a few large
*shard* files plus an index; :class:`~cassava_pipeline.vision.shards.ShardedImages` reads any
image by random access. Two encodings:

- ``raw``: uint8 HxWx3 pixels. Training never decodes an image. Every output size is known from
  the manifest before decoding, so each image's byte offset is fixed up front and the worker
  processes write straight into preallocated shards (``os.pwrite``): nothing but file names
  crosses process boundaries. About 6x the size of Kaggle's JPEGs at 460.
- ``jpeg``: re-encoded at ``jpeg_quality`` (95: ~11x smaller than raw); workers return the
  bytes, the parent appends them in order. Training decodes each item (about 1 ms at 460).

Either way memory stays flat whatever the data set's size (a bounded number of chunks in
flight), and the output is byte-identical whatever the number of workers.

``meta.json`` records the sha256 of every shard file and of the index, and a content digest in
parts (:func:`content_digests`: split, labels, source images, presize settings, classes, pixels),
so that a training stage can tell whether it was trained on exactly these shards, and say why
not.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from annotated_types import Ge, Le
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from .images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    content_hash,
    decode_rgb_sized,
    read_bytes,
)
from .integrity import DIGEST_KEY, content_sha256, file_sha256
from .options import STRICT, NonNegativeInt, PositiveInt, Side, check_choices
from .parallel import chunked, ordered_map, resolve_workers
from .provenance import digest, module_digests, versions

SHARD_FORMAT = "cassava-pipeline/shards-v2"  # v2: content digests in meta.json
# Modules whose code shapes the shards' bytes (by file name, next to this one), and packages
# whose versions do (the JPEG decoder and encoder, the resize kernel): a shard set is reused
# only when they are equal too.
PRESIZE_MODULES = ("presize.py", "images.py")
PRESIZE_PACKAGES = ("pillow", "numpy", "torch", "torchvision")
INDEX_FILE = "index.parquet"
META_FILE = "meta.json"


class PresizeError(RuntimeError):
    """An image could not be presized (it changed or vanished after ingest)."""


@dataclass(frozen=True)
class PresizeOptions:
    """How to presize."""

    __pydantic_config__ = STRICT

    size: Side = 460  # fastai's Resize(460) in the seeds: shorter side after presizing
    workers: NonNegativeInt = 0  # processes; 0 = all cores
    shard_mb: PositiveInt = 1024  # a shard file's limit (MiB), unless one image is larger
    chunk_size: PositiveInt = 32  # images per task sent to a worker
    max_image_pixels: PositiveInt = DEFAULT_MAX_PIXELS  # same bomb limit as ingest
    jpeg_draft: bool = False  # True: JPEGs >= 2x the target decoded at 1/2, 1/4 or 1/8 scale
    encoding: Literal["raw", "jpeg"] = "raw"  # raw: uint8 pixels, no decoding; jpeg: ~10x smaller
    jpeg_quality: Annotated[int, Ge(1), Le(100)] = 95  # for encoding: jpeg

    def __post_init__(self) -> None:
        check_choices(self, "presize")


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


def presize_bytes(
    data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = False
) -> np.ndarray:
    """Decode and presize one image held in memory, exactly as :func:`write_shards` would.

    Prediction uses it on images that were never ingested: the output size comes from the
    image's own (oriented) size, as ingest would have recorded it.
    """
    img, (width, height) = decode_rgb_sized(
        data, max_pixels=max_pixels, min_side=size if draft else None
    )
    return resize_shorter(img, *target_size(width, height, size))


def plan_sizes(manifest: pd.DataFrame, size: int) -> pd.DataFrame:
    """The manifest plus out_width, out_height and (raw) nbytes of each presized image."""
    sizes = [
        target_size(w, h, size) for w, h in zip(manifest["width"], manifest["height"], strict=True)
    ]
    out = manifest.reset_index(drop=True).copy()
    out["out_width"] = np.array([s[0] for s in sizes], dtype=np.int64)
    out["out_height"] = np.array([s[1] for s in sizes], dtype=np.int64)
    out["nbytes"] = out["out_width"] * out["out_height"] * 3
    return out


def upscaled(manifest: pd.DataFrame, size: int) -> pd.DataFrame:
    """The images whose shorter side is under ``size``: presizing enlarges them (path, width,
    height), which blurs them; worth a warning, as fastai's Resize does it silently."""
    short = np.minimum(manifest["width"].to_numpy(), manifest["height"].to_numpy())
    return manifest.loc[short < size, ["path", "width", "height"]].reset_index(drop=True)


def upscaled_lines(manifest: pd.DataFrame, size: int, show: int = 10) -> list[str]:
    """Warnings counting and naming the images ``size`` enlarges."""
    small = upscaled(manifest, size)
    if small.empty:
        return []
    named = "; ".join(f"{p} ({w}x{h})" for p, w, h in small.head(show).itertuples(index=False))
    more = f"; and {len(small) - show:,} more (meta.json: upscaled)" if len(small) > show else ""
    return [
        f"presize {size}: {len(small):,} of {len(manifest):,} images have a shorter side under "
        f"{size} px and are enlarged: {named}{more}. A smaller presize (and size) suits them "
        "better."
    ]


def _assign_shards(nbytes: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, offset) of consecutive items; a new shard starts where one would pass ``limit``."""
    shard = np.zeros(len(nbytes), dtype=np.int64)
    offset = np.zeros(len(nbytes), dtype=np.int64)
    cur_shard, cur_off = 0, 0
    for i, n in enumerate(nbytes):
        if cur_off and cur_off + n > limit:
            cur_shard, cur_off = cur_shard + 1, 0
        shard[i], offset[i] = cur_shard, cur_off
        cur_off += int(n)
    return shard, offset


def shard_name(i: int) -> str:
    """File name of shard ``i``."""
    return f"shard-{i:05d}.bin"


def dct_scaled_sizes(width: int, height: int) -> tuple[tuple[int, int], ...]:
    """Every (width, height) a JPEG of this (oriented) size can decode to with DCT scaling.

    libjpeg scales each side by 1/2^k (k = 0..3) and rounds up: ``ceil(side / 2^k)``. Rounding
    each side on its own is what lets a near-square 499x500 decode to 250x250 at 1/2. The EXIF
    transpose swaps both sides together, so the same rule holds before and after it.
    """
    return tuple((-(-width // 2**k), -(-height // 2**k)) for k in range(4))


def decoded_size_problem(
    decoded: tuple[int, int], full: tuple[int, int], ingest: tuple[int, int]
) -> str | None:
    """Why a decoded image does not match what ingest recorded (``None`` when it does).

    ``decoded``: the array's (width, height); ``full``: the file's own size after EXIF
    orientation, as the header says now; ``ingest``: the (width, height) ingest recorded.
    """
    if full != ingest:
        return (
            f"its header says {full[0]}x{full[1]} now but ingest recorded {ingest[0]}x{ingest[1]}"
        )
    if decoded not in dct_scaled_sizes(*full):
        return (
            f"it decoded to {decoded[0]}x{decoded[1]}, which is not {full[0]}x{full[1]} at any "
            "DCT scale (1, 1/2, 1/4, 1/8)"
        )
    return None


def _presize_one(root: str, row: tuple, size: int, max_pixels: int, draft: bool) -> np.ndarray:
    rel, out_w, out_h, src_w, src_h, src_hash = row
    data = read_bytes(os.path.join(root, rel))
    img, full = decode_rgb_sized(data, max_pixels=max_pixels, min_side=size if draft else None)
    problem = decoded_size_problem((img.shape[1], img.shape[0]), full, (src_w, src_h))
    if problem is not None:
        if src_hash is not None and content_hash(data) != src_hash:
            raise ImageError("the file changed", f"its bytes differ from ingest's; {problem}")
        # The same bytes as at ingest: the decoder disagrees with itself, not the data.
        raise ImageError("decoder mismatch", f"the bytes are ingest's, but {problem}")
    return resize_shorter(img, out_w, out_h)


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _raw_chunk(args: tuple) -> list[tuple[str, str]]:
    """Presize a chunk straight into the preallocated raw shards; return the errors."""
    root, out_dir, rows, places, size, max_pixels, draft = args
    errors: list[tuple[str, str]] = []
    fds: dict[int, int] = {}
    try:
        for row, (shard, offset) in zip(rows, places, strict=True):
            try:
                out = _presize_one(root, row, size, max_pixels, draft)
            except ImageError as e:
                errors.append((row[0], str(e)))
                continue
            if shard not in fds:
                fds[shard] = os.open(os.path.join(out_dir, shard_name(shard)), os.O_WRONLY)
            os.pwrite(fds[shard], memoryview(out).cast("B"), offset)
    finally:
        for fd in fds.values():
            os.close(fd)
    return errors


def _jpeg_chunk(args: tuple) -> list[bytes | tuple[str, str]]:
    """Presize and encode a chunk; JPEG sizes are unknown in advance, so the parent writes."""
    root, rows, size, max_pixels, draft, quality = args
    out: list[bytes | tuple[str, str]] = []
    for row in rows:
        try:
            out.append(_encode_jpeg(_presize_one(root, row, size, max_pixels, draft), quality))
        except ImageError as e:
            out.append((row[0], str(e)))
    return out


def content_digests(
    index: pd.DataFrame, classes: tuple[str, ...], options: PresizeOptions, shard_sha256: list[str]
) -> dict[str, str]:
    """Digests of what a shard set holds, in parts a changed input can be traced to.

    split: which images are on the validation side; labels: each path's label; images: each
    source file's content hash and size; presize: the settings that shape the pixels; classes;
    pixels: the shard files themselves; digest: all of them together.
    """
    path = index["path"].astype(str).tolist()
    parts = {
        "split": digest([path, index["is_valid"].fillna(False).astype(bool).tolist()]),
        "labels": digest([path, index["label"].astype(int).tolist()]),
        "images": digest(
            [
                path,
                index["hash"].astype(str).tolist() if "hash" in index else [],
                index["width"].astype(int).tolist(),
                index["height"].astype(int).tolist(),
            ]
        ),
        "presize": digest(
            {
                "format": SHARD_FORMAT,
                "size": options.size,
                "jpeg_draft": options.jpeg_draft,
                "encoding": options.encoding,
                "jpeg_quality": options.jpeg_quality if options.encoding == "jpeg" else None,
            }
        ),
        "classes": digest(list(classes)),
        "pixels": digest(list(shard_sha256)),
    }
    return {**parts, "digest": digest(parts)}


def job_inputs(job: PresizeJob) -> dict[str, str]:
    """Digests of everything a shard set's bytes are computed from, in parts: the content parts
    of :func:`content_digests` but ``pixels`` (split, labels, source images by content hash,
    presize settings, classes), the shard layout (``shard_mb``), the code of
    :data:`PRESIZE_MODULES` and the versions of :data:`PRESIZE_PACKAGES`. Equal inputs give
    byte-identical shards (the output does not depend on the number of workers), so a set
    written from equal inputs is reused instead of written again."""
    index = plan_sizes(job.manifest, job.options.size)
    if "is_valid" not in index:
        index["is_valid"] = False
    parts = content_digests(index, tuple(job.classes), job.options, [])
    del parts["pixels"], parts["digest"]
    return {
        **parts,
        "layout": digest({"shard_mb": job.options.shard_mb}),
        "code": digest(module_digests(PRESIZE_MODULES)),
        "packages": digest(versions(PRESIZE_PACKAGES)),
    }


# What a differing part of job_inputs means, in words.
INPUT_PARTS = {
    "split": "the split changed",
    "labels": "labels or files changed",
    "images": "source images changed",
    "presize": "presize settings changed",
    "classes": "classes changed",
    "layout": "shard_mb changed",
    "code": "the presize code changed",
    "packages": "the decoder or resize packages changed",
}


def _raise_errors(errors: list[tuple[str, str]]) -> None:
    if not errors:
        return
    shown = "; ".join(f"{p}: {r}" for p, r in errors[:10])
    changed = sum(r.startswith("the file changed") for _, r in errors)
    decoder = sum(r.startswith("decoder mismatch") for _, r in errors)
    advice = []
    if changed:
        advice.append(
            f"{changed} file(s) changed after ingest (their bytes' hash differs): rerun the "
            "pipeline from ingest"
        )
    if decoder:
        advice.append(
            f"{decoder} file(s) are unchanged but decode to another size than ingest saw: a "
            "decoder bug; set presize.jpeg_draft: false to decode them at full size, and report it"
        )
    if len(errors) > changed + decoder:
        advice.append(
            "the other files became unreadable after ingest: restore them or rerun ingest"
        )
    raise PresizeError(
        f"{len(errors)} image(s) could not be presized although ingest accepted them: {shown}. "
        + "; ".join(advice)
        + "."
    )


def _write_raw(job: PresizeJob, index: pd.DataFrame, rows: list, out_dir: Path, workers: int):
    opts = job.options
    layout = _assign_shards(index["nbytes"].to_numpy(), opts.shard_mb * 2**20)
    index["shard"], index["offset"] = layout
    shard_sizes = (index["offset"] + index["nbytes"]).groupby(index["shard"]).max()
    for shard, total in shard_sizes.items():
        with open(out_dir / shard_name(int(shard)), "wb") as f:
            f.truncate(int(total))  # preallocate: workers write at fixed offsets
    places = list(zip(index["shard"].tolist(), index["offset"].tolist(), strict=True))
    tasks = [
        (job.root, str(out_dir), r, p, opts.size, opts.max_image_pixels, opts.jpeg_draft)
        for r, p in zip(
            chunked(rows, opts.chunk_size), chunked(places, opts.chunk_size), strict=True
        )
    ]
    errors = [e for errs in ordered_map(_raw_chunk, tasks, workers=workers) for e in errs]
    _raise_errors(errors)
    # Workers wrote at scattered offsets: hash each finished shard (from the page cache).
    paths = [str(out_dir / shard_name(int(s))) for s in shard_sizes.index]
    return list(ordered_map(file_sha256, paths, workers=min(workers, len(paths))))


def _write_jpeg(job: PresizeJob, index: pd.DataFrame, rows: list, out_dir: Path, workers: int):
    opts = job.options
    limit = opts.shard_mb * 2**20
    tasks = [
        (job.root, c, opts.size, opts.max_image_pixels, opts.jpeg_draft, opts.jpeg_quality)
        for c in chunked(rows, opts.chunk_size)
    ]
    shard, offset, nbytes, errors = [], [], [], []
    cur_shard, cur_off, f = 0, 0, None
    hashes: list = []  # sha256 of each shard, fed as it is written
    try:
        for results in ordered_map(_jpeg_chunk, tasks, workers=workers):
            for res in results:
                if isinstance(res, tuple):
                    errors.append(res)
                data = res if isinstance(res, bytes) else b""
                if f is None or (cur_off and cur_off + len(data) > limit):
                    if f is not None:
                        f.close()
                        cur_shard, cur_off = cur_shard + 1, 0
                    f = open(out_dir / shard_name(cur_shard), "wb")  # noqa: SIM115
                    hashes.append(hashlib.sha256())
                f.write(data)
                hashes[-1].update(data)
                shard.append(cur_shard)
                offset.append(cur_off)
                nbytes.append(len(data))
                cur_off += len(data)
    finally:
        if f is not None:
            f.close()
    _raise_errors(errors)
    index["shard"], index["offset"], index["nbytes"] = shard, offset, nbytes
    return [h.hexdigest() for h in hashes]


def write_shards(job: PresizeJob, out_dir: Path) -> pd.DataFrame:
    """Presize every image of ``job`` into shard files under ``out_dir`` (which must be empty)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = job.options
    index = plan_sizes(job.manifest, opts.size)
    rows = list(
        zip(
            index["path"],
            index["out_width"].tolist(),
            index["out_height"].tolist(),
            index["width"].tolist(),
            index["height"].tolist(),
            index["hash"].astype(str).tolist() if "hash" in index else [None] * len(index),
            strict=True,
        )
    )
    workers = resolve_workers(opts.workers)
    if len(rows) < 2 * opts.chunk_size:
        workers = 1  # a pool costs more than it saves on a handful of images
    if "is_valid" not in index:
        index["is_valid"] = False  # an unsplit set: everything is training data
    if opts.encoding == "raw":
        shard_sha256 = _write_raw(job, index, rows, out_dir, workers)
    else:
        shard_sha256 = _write_jpeg(job, index, rows, out_dir, workers)
    for col in ("shard", "offset", "nbytes"):
        index[col] = index[col].astype(np.int64)
    index.to_parquet(out_dir / INDEX_FILE, index=False)
    shard_bytes = (index["offset"] + index["nbytes"]).groupby(index["shard"]).max()
    small = upscaled(job.manifest, opts.size)
    meta = {
        "format": SHARD_FORMAT,
        "encoding": opts.encoding,
        "size": opts.size,
        "dtype": "uint8",
        "layout": "HWC",
        "classes": list(job.classes),
        "n_images": len(index),
        "shards": [
            {"file": shard_name(int(s)), "bytes": int(b), "sha256": h}
            for (s, b), h in zip(shard_bytes.items(), shard_sha256, strict=True)
        ],
        "index_sha256": file_sha256(out_dir / INDEX_FILE),
        "content": content_digests(index, tuple(job.classes), opts, shard_sha256),
        "inputs": job_inputs(job),
        "upscaled": small.head(100).to_dict("records"),  # the first 100, with their sizes
        "n_upscaled": len(small),
    }
    meta[DIGEST_KEY] = content_sha256(meta)  # of meta.json itself (every other key)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return index
