"""Tiny generated images for tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def gradient_rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth, seed-dependent RGB image (JPEG keeps it close to the original)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0.2, 1.0, 3)
    img = np.stack(
        [
            x / max(w - 1, 1) * 255 * c[0],
            y / max(h - 1, 1) * 255 * c[1],
            (x + y) / max(w + h - 2, 1) * 255 * c[2],
        ],
        axis=-1,
    )
    return img.astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 95, exif=None) -> bytes:
    buf = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def write_jpeg(path: Path, w: int = 40, h: int = 30, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(gradient_rgb(w, h, seed)))
    return path
