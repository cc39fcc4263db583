"""Decoding: every odd mode becomes correct RGB, every bad file a named reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cassava_pipeline.vision.images import ImageError, decode_rgb, inspect_image
from tests.images import gradient_rgb, jpeg_bytes


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_rgb_jpeg_decodes_close_to_source():
    src = gradient_rgb(64, 48)
    out = decode_rgb(jpeg_bytes(src))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - src).mean() < 2.0


def test_grayscale_becomes_three_equal_channels():
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    out = decode_rgb(png(gray))
    assert out.shape == (16, 16, 3)
    assert (out[..., 0] == np.asarray(gray)).all() and (out[..., 0] == out[..., 2]).all()


def test_sixteen_bit_is_scaled_not_saturated():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    im = Image.fromarray(values)  # mode I;16
    out = decode_rgb(png(im))
    # PIL's convert("L") would clip everything above 255 to 255.
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_rgba_transparent_pixels_become_background_white():
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red stored under the alpha
    arr[:2, :, 3] = 255  # top half opaque, bottom half transparent
    out = decode_rgb(png(Image.fromarray(arr, "RGBA")))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[3, 0].tolist() == [255, 255, 255]


def test_la_half_transparent_is_blended():
    arr = np.zeros((2, 2, 2), dtype=np.uint8)
    arr[..., 1] = 128  # black at ~50% alpha over white
    out = decode_rgb(png(Image.fromarray(arr, "LA")))
    assert 120 <= out[0, 0, 0] <= 135


def test_palette_with_transparency():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.info["transparency"] = 0
    out = decode_rgb(png(im))
    assert out[0, 0].tolist() == [250, 0, 0]  # opaque palette entry kept
    assert out[1, 1].tolist() == [255, 255, 255]  # transparent index -> background


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.fromarray(gradient_rgb(16, 16)).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    out = decode_rgb(buf.getvalue())
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - gradient_rgb(16, 16)).mean() < 6


def test_exif_orientation_is_applied():
    src = np.zeros((20, 40, 3), dtype=np.uint8)
    src[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = jpeg_bytes(src, exif=exif.tobytes())
    info = inspect_image(data)
    assert (info.width, info.height) == (20, 40)
    out = decode_rgb(data)
    assert out.shape == (40, 20, 3)
    assert out[:18].mean() > 200 and out[22:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is a text file, not an image\n" * 3, "not an image"),
        (bytes(range(256)) * 4, "not an image"),
    ],
)
def test_unusable_bytes_name_their_reason(data, reason):
    with pytest.raises(ImageError) as e:
        inspect_image(data)
    assert e.value.reason == reason


def test_truncated_jpeg_is_detected():
    data = jpeg_bytes(gradient_rgb(200, 150, seed=3), quality=90)
    with pytest.raises(ImageError) as e:
        inspect_image(data[: len(data) // 2])
    assert e.value.reason == "truncated image"
    with pytest.raises(ImageError):
        decode_rgb(data[: len(data) // 2])


def test_decompression_bomb_is_refused():
    data = jpeg_bytes(gradient_rgb(100, 100))
    with pytest.raises(ImageError) as e:
        inspect_image(data, max_pixels=4_000)  # over twice the limit: PIL's own error
    assert e.value.reason == "decompression bomb"
    # the limit the user set, not PIL's hard limit (twice it)
    assert e.value.detail == "10,000 pixels is over max_image_pixels (4,000)"
    # Between the limit and twice the limit PIL only warns; it is refused all the same.
    with pytest.raises(ImageError) as e:
        inspect_image(data, max_pixels=9_999)
    assert e.value.detail == "10,000 pixels is over max_image_pixels (9,999)"
    assert inspect_image(data, max_pixels=10_000).width == 100


def test_draft_decode_keeps_shorter_side_at_least_min_side():
    data = jpeg_bytes(gradient_rgb(400, 300))
    out = decode_rgb(data, min_side=70)  # 300 / 4 = 75 >= 70, 300 / 8 < 70
    assert out.shape == (75, 100, 3)
    assert decode_rgb(data, min_side=200).shape == (300, 400, 3)  # < 2x: full decode


def test_content_hash_equal_for_identical_bytes():
    a = jpeg_bytes(gradient_rgb(8, 8, 1))
    b = jpeg_bytes(gradient_rgb(8, 8, 2))
    assert inspect_image(a).hash == inspect_image(bytes(a)).hash != inspect_image(b).hash
