"""Decode image files into correct RGB arrays, and say exactly why a file cannot be used.

Everything here works on bytes, so the same code serves ingest (verify), presize (decode and
resize) and prediction. PIL does the decoding: it reads every format and mode a user may bring
(JPEG, PNG, WebP, TIFF, GIF; L, LA, P, RGBA, CMYK, 16-bit), as fastai does.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own default: images above this many pixels are treated as decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485

_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageError(ValueError):
    """A file that cannot be used as an image; ``reason`` is short and stable (used in reports)."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class ImageInfo:
    """What ingest records of a usable image: size after EXIF orientation, mode, content hash."""

    width: int
    height: int
    mode: str
    format: str
    hash: str


def content_hash(data: bytes) -> str:
    """Hash of the file's bytes; byte-identical files share it (used to find duplicates)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty file", "0 bytes")
    with warnings.catch_warnings():
        # PIL only warns between max_pixels and twice that; a bomb is a bomb either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                raise ImageError(
                    "decompression bomb",
                    f"{im.width}x{im.height} = {im.width * im.height:,} pixels is over "
                    f"max_image_pixels ({max_pixels:,})",
                )
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # PIL's own message quotes its hard limit, twice max_pixels: say ours
            found = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(found.group(1)):,} pixels" if found else "its size"
            raise ImageError(
                "decompression bomb", f"{size} is over max_image_pixels ({max_pixels:,})"
            ) from e
        except UnidentifiedImageError as e:
            raise ImageError("not an image", "no image format recognises these bytes") from e
        except ImageError:
            raise
        except Exception as e:  # PIL raises many types for malformed headers
            raise ImageError(_damage(e), f"{type(e).__name__}: {e}") from e
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
    return im


def _damage(e: Exception) -> str:
    return "truncated image" if "truncated" in str(e).lower() else "corrupt image"


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Exception as e:
        raise ImageError(_damage(e), f"{type(e).__name__}: {e}") from e


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1


def inspect_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Open and fully decode ``data`` (cheaply) to prove it is a usable image.

    JPEGs are decoded with DCT scaling (PIL's ``draft``): every compressed byte is still read, so
    truncation is caught, at a fraction of the cost of a full decode.
    """
    im = _open(data, max_pixels)
    width, height, fmt = im.width, im.height, im.format or "unknown"
    orientation = _orientation(im)
    if fmt == "JPEG":
        im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
    _load(im)
    mode = im.mode
    if orientation in _ROTATED_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width=width, height=height, mode=mode, format=fmt, hash=content_hash(data))


def _sixteen_bit_to_uint8(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        return np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # Scale the 16-bit range down instead of saturating at 255 as PIL's convert("L") does.
    return (arr.astype(np.uint32) >> 8).astype(np.uint8)


def to_rgb_array(
    im: Image.Image, *, background: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """Convert a loaded PIL image of any mode into an HxWx3 uint8 RGB array.

    Transparent pixels are composited onto ``background`` rather than showing whatever colour
    happens to be stored under alpha 0.
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _sixteen_bit_to_uint8(im) if mode != "I" else _int32_to_uint8(im)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "P":
        im = im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return np.asarray(Image.alpha_composite(base, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))  # L, 1, CMYK, YCbCr, LAB, HSV


def _int32_to_uint8(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im)
    # PIL loads 16-bit PNG greyscale as mode "I"; values then span 0..65535.
    if arr.max(initial=0) > 255:
        return (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def decode_rgb_sized(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`decode_rgb`, plus the image's full (width, height) after EXIF orientation.

    With DCT scaling the array is smaller than the image; the full size is what ingest records
    and what presize computes its output size from.
    """
    im = _open(data, max_pixels)
    width, height = im.size
    if min_side is not None and im.format == "JPEG" and min(im.size) >= 2 * min_side:
        scale = min(im.size) / min_side
        im.draft(im.mode, (int(im.width / scale) + 1, int(im.height / scale) + 1))
    _load(im)
    orientation = _orientation(im)
    if orientation in _ROTATED_ORIENTATIONS:
        width, height = height, width
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    return to_rgb_array(im), (width, height)


def decode_rgb(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> np.ndarray:
    """Decode ``data`` to an HxWx3 uint8 RGB array with EXIF orientation applied.

    ``min_side``: when given, a JPEG whose shorter side is at least twice this is decoded at a
    reduced scale (DCT scaling: 1/2, 1/4 or 1/8) that still leaves the shorter side >= min_side.
    """
    return decode_rgb_sized(data, max_pixels=max_pixels, min_side=min_side)[0]


def read_bytes(path: str) -> bytes:
    """Read a file, turning OS errors into an :class:`ImageError` that names the reason."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        if os.path.islink(path):
            raise ImageError("dangling link", f"{path} -> {os.readlink(path)}") from e
        raise ImageError("missing file", str(path)) from e
    except IsADirectoryError as e:
        raise ImageError("not a file", f"{path} is a directory") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError("symlink loop", f"{path} never reaches a file") from e
        raise ImageError("unreadable file", f"{path}: {e}") from e
