"""Presize into shards: sizes, pixels, orientation, determinism, random access."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from cassava_pipeline.vision.images import decode_rgb_sized
from cassava_pipeline.vision.ingest import IngestOptions, ingest
from cassava_pipeline.vision.layouts import CsvLayout, FolderLayout
from cassava_pipeline.vision.presize import (
    PresizeError,
    PresizeJob,
    PresizeOptions,
    dct_scaled_sizes,
    decoded_size_problem,
    plan_sizes,
    resize_shorter,
    target_size,
    write_shards,
)
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.split import SplitOptions, split
from tests.images import gradient_rgb, jpeg_bytes


def job(root: Path, size: int, **opts) -> PresizeJob:
    manifest, report = ingest(root, CsvLayout(), IngestOptions(workers=1))
    classes = [c["name"] for c in report["classes"]]
    manifest, _ = split(manifest, classes, SplitOptions())
    return PresizeJob(str(root), manifest, tuple(classes), PresizeOptions(size=size, **opts))


def test_target_size_keeps_aspect():
    assert target_size(800, 600, 460) == (613, 460)
    assert target_size(400, 533, 460) == (460, 613)
    assert target_size(50, 50, 20) == (20, 20)


def test_resize_matches_pil_bilinear():
    src = gradient_rgb(80, 60, seed=5)
    ours = resize_shorter(src, 40, 30)
    pil = np.asarray(Image.fromarray(src).resize((40, 30), Image.BILINEAR))
    assert ours.shape == (30, 40, 3)
    assert np.abs(ours.astype(int) - pil).max() <= 1


def test_shards_hold_the_resized_pixels(kaggle_dir: Path, tmp_path: Path):
    j = job(kaggle_dir, 20, workers=1)
    index = write_shards(j, tmp_path / "out")
    ds = ShardedImages(tmp_path / "out")
    assert len(ds) == 18 and ds.size == 20 and ds.classes == ["alpha", "beta", "gamma"]
    img, label = ds[3]
    assert img.shape == (20, 27, 3) and img.dtype == np.uint8  # 40x30 -> 27x20
    row = index.iloc[3]
    assert label == row["label"]
    raw = np.asarray(Image.open(kaggle_dir / row["path"]).convert("RGB"))
    expect = TF.resize(torch.from_numpy(raw).permute(2, 0, 1), [20, 27], antialias=True)
    assert np.array_equal(img, expect.permute(1, 2, 0).numpy())
    assert ds[-1][0].shape == (20, 27, 3)
    with pytest.raises(IndexError):
        ds[18]


def test_parallel_output_is_byte_identical(kaggle_dir: Path, tmp_path: Path):
    write_shards(job(kaggle_dir, 24, workers=1), tmp_path / "a")
    write_shards(job(kaggle_dir, 24, workers=2, chunk_size=2), tmp_path / "b")
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_several_shards_and_split_views(kaggle_dir: Path, tmp_path: Path):
    j = job(kaggle_dir, 20)
    assert plan_sizes(j.manifest, 20)["nbytes"].tolist() == [20 * 27 * 3] * 18
    index = write_shards(
        PresizeJob(j.root, j.manifest, j.classes, PresizeOptions(size=20, shard_mb=0)),
        tmp_path / "s",
    )
    assert index["shard"].tolist() == list(range(18))  # a limit below one image: one per shard
    assert len(list((tmp_path / "s").glob("shard-*.bin"))) == 18
    ds = ShardedImages(tmp_path / "s")
    train, valid = ds.split()
    assert len(train) + len(valid) == 18 and len(valid) == int(index["is_valid"].sum())
    assert valid.index["is_valid"].all() and not train.index["is_valid"].any()
    # Views are picklable (DataLoader workers) and read the same pixels.
    clone = pickle.loads(pickle.dumps(valid))
    assert np.array_equal(clone[0][0], valid[0][0])


def test_exif_and_odd_modes_are_presized_upright(tmp_path: Path):
    root = tmp_path / "x"
    (root / "a").mkdir(parents=True)
    src = np.zeros((20, 40, 3), dtype=np.uint8)
    src[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "a" / "rot.jpg").write_bytes(jpeg_bytes(src, exif=exif.tobytes()))
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(root / "a" / "white16.png")
    manifest, _ = ingest(root, FolderLayout(), IngestOptions(workers=1))
    manifest, _ = split(manifest, ["a"], SplitOptions(valid_pct=0.0))
    write_shards(PresizeJob(str(root), manifest, ("a",), PresizeOptions(size=10)), tmp_path / "o")
    ds = ShardedImages(tmp_path / "o")
    paths = ds.index["path"].tolist()
    rot = ds[paths.index("a/rot.jpg")][0]
    assert rot.shape == (20, 10, 3) and rot[:8].mean() > 200 and rot[12:].mean() < 50
    assert ds[paths.index("a/white16.png")][0].min() == 255  # 16-bit white stays white


def test_file_changed_after_ingest_is_an_error(kaggle_dir: Path, tmp_path: Path):
    j = job(kaggle_dir, 20)
    path = kaggle_dir / j.manifest["path"].iat[0]
    path.write_bytes(jpeg_bytes(gradient_rgb(30, 40)))  # now portrait
    (kaggle_dir / j.manifest["path"].iat[1]).unlink()
    with pytest.raises(PresizeError, match="rerun the pipeline from ingest") as e:
        write_shards(j, tmp_path / "o")
    assert "the file changed" in str(e.value) and "missing file" in str(e.value)


def test_reader_refuses_a_folder_without_shards(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="presize"):
        ShardedImages(tmp_path)


def test_empty_manifest_gives_empty_set(tmp_path: Path):
    empty = pd.DataFrame(
        columns=["path", "label", "label_name", "is_valid", "width", "height", "hash"]
    ).astype({"width": int, "height": int, "label": int})
    write_shards(PresizeJob(str(tmp_path), empty, (), PresizeOptions(size=8)), tmp_path / "o")
    assert len(ShardedImages(tmp_path / "o")) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_jpeg_encoding_is_small_close_and_deterministic(kaggle_dir: Path, tmp_path: Path, workers):
    raw = write_shards(job(kaggle_dir, 24, workers=1), tmp_path / "raw")
    jp = write_shards(
        job(kaggle_dir, 24, workers=workers, chunk_size=2, encoding="jpeg", shard_mb=0),
        tmp_path / "jpeg",
    )
    assert (jp["nbytes"] < raw["nbytes"]).all()
    assert jp["shard"].tolist() == list(range(18))
    a, b = ShardedImages(tmp_path / "raw"), ShardedImages(tmp_path / "jpeg")
    for i in (0, 7, 17):
        assert a[i][0].shape == b[i][0].shape and a[i][1] == b[i][1]
        assert np.abs(a[i][0].astype(int) - b[i][0]).mean() < 3  # quality 95
    again = write_shards(
        job(kaggle_dir, 24, workers=1, encoding="jpeg", shard_mb=0), tmp_path / "again"
    )
    assert again.equals(jp)
    for f in (tmp_path / "jpeg").glob("shard-*.bin"):
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes()


def test_unknown_encoding(kaggle_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="encoding"):
        write_shards(job(kaggle_dir, 20, encoding="png"), tmp_path / "o")


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_meta_records_the_digest_of_every_file(kaggle_dir: Path, tmp_path: Path, encoding):
    write_shards(
        job(kaggle_dir, 20, workers=2, chunk_size=2, shard_mb=0, encoding=encoding), tmp_path
    )
    meta = ShardedImages(tmp_path).meta
    assert len(meta["shards"]) == 18  # shard_mb 0: one image per shard
    for shard in meta["shards"]:
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)
    index = (tmp_path / "index.parquet").read_bytes()
    assert meta["index_sha256"] == hashlib.sha256(index).hexdigest()


def test_content_digests_trace_each_change_to_its_part(kaggle_dir: Path, tmp_path: Path):
    """Same inputs, same digests (whatever the workers); each kind of change moves its parts."""

    def content(name: str, j: PresizeJob) -> dict[str, str]:
        write_shards(j, tmp_path / name)
        return ShardedImages(tmp_path / name).content

    base_job = job(kaggle_dir, 20, workers=1)
    base = content("base", base_job)
    assert set(base) == {"split", "labels", "images", "presize", "classes", "pixels", "digest"}
    assert content("workers", job(kaggle_dir, 20, workers=2, chunk_size=2)) == base

    def changed(other: dict[str, str]) -> set[str]:
        return {k for k in base if other[k] != base[k]}

    manifest = base_job.manifest.copy()
    manifest["is_valid"] = ~manifest["is_valid"].astype(bool)  # another split, same images
    assert changed(content("split", replace(base_job, manifest=manifest))) == {"split", "digest"}
    manifest = base_job.manifest.copy()
    manifest["label"] = (manifest["label"] + 1) % 3
    assert changed(content("labels", replace(base_job, manifest=manifest))) == {"labels", "digest"}
    bigger = content("size", job(kaggle_dir, 24, workers=1))
    assert changed(bigger) == {"presize", "pixels", "digest"}
    jpeg = content("jpeg", job(kaggle_dir, 20, workers=1, encoding="jpeg"))
    assert changed(jpeg) == {"presize", "pixels", "digest"}
    path = kaggle_dir / base_job.manifest["path"].iat[0]  # one source image redrawn
    path.write_bytes(jpeg_bytes(gradient_rgb(30, 40, seed=99)))
    assert changed(content("image", job(kaggle_dir, 20, workers=1))) == {
        "images",
        "pixels",
        "digest",
    }


def test_images_smaller_than_the_presize_are_counted_and_named(kaggle_dir: Path, tmp_path: Path):
    """A 193x130 photo under a 320 presize is enlarged: the warning counts and names it, and
    meta.json keeps the list."""
    from cassava_pipeline.vision.presize import upscaled_lines

    manifest = pd.DataFrame(
        {"path": ["big.jpg", "small.jpg", "tall.jpg"], "width": [800, 193, 300],
         "height": [600, 130, 900]}
    )  # fmt: skip
    (line,) = upscaled_lines(manifest, 320)
    assert line.startswith("presize 320: 2 of 3 images have a shorter side under 320 px")
    assert "small.jpg (193x130); tall.jpg (300x900)" in line and "big.jpg" not in line
    assert upscaled_lines(manifest, 130) == []

    m, r = ingest(kaggle_dir, CsvLayout(), IngestOptions(workers=1))
    classes = tuple(c["name"] for c in r["classes"])
    side = int(np.minimum(m["width"], m["height"]).max())  # every image's shorter side <= it
    write_shards(PresizeJob(str(kaggle_dir), m, classes, PresizeOptions(size=side + 1, workers=1)),
                 tmp_path / "s")  # fmt: skip
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["n_upscaled"] == len(m) and len(meta["upscaled"]) == len(m)


def test_dct_scaled_sizes_are_what_the_decoder_gives_for_every_size():
    # Every (w, h) in 8..63 (odd, even, square and near-square at each of the four scales), with
    # and without an EXIF rotation: the decoded size is always one of dct_scaled_sizes, and the
    # check accepts it. The old orientation test rejected near-square odd sizes such as 17x18.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: width and height swap after decoding
    rotated = exif.tobytes()
    hit = {k: 0 for k in range(4)}
    for w in range(8, 64):
        for h in range(8, 64):
            for exif_bytes in (None, rotated) if (w + h) % 5 == 0 else (None,):
                data = jpeg_bytes(np.full((h, w, 3), 128, dtype=np.uint8), exif=exif_bytes)
                full = (h, w) if exif_bytes else (w, h)
                sizes = dct_scaled_sizes(*full)
                for min_side in {min(w, h) // d for d in (1, 2, 4, 8, 16) if min(w, h) // d >= 1}:
                    img, got_full = decode_rgb_sized(data, min_side=min_side)
                    decoded = (img.shape[1], img.shape[0])
                    assert got_full == full
                    assert decoded in sizes, (w, h, min_side, decoded)
                    assert min(decoded) >= min_side
                    assert decoded_size_problem(decoded, full, full) is None
                    hit[sizes.index(decoded)] += 1
    assert min(hit.values()) > 500, hit  # every scale was reached many times


def test_near_square_odd_jpeg_presizes_with_draft(tmp_path: Path):
    # The case a user hit: 499x500 decodes to 250x250 at 1/2 (each side rounded up).
    root = tmp_path / "x"
    (root / "a").mkdir(parents=True)
    (root / "a" / "near_square.jpg").write_bytes(jpeg_bytes(gradient_rgb(499, 500)))
    (root / "a" / "square.jpg").write_bytes(jpeg_bytes(gradient_rgb(333, 333)))
    manifest, _ = ingest(root, FolderLayout(), IngestOptions(workers=1))
    manifest, _ = split(manifest, ["a"], SplitOptions(valid_pct=0.0))
    opts = PresizeOptions(size=100, jpeg_draft=True)
    write_shards(PresizeJob(str(root), manifest, ("a",), opts), tmp_path / "o")
    ds = ShardedImages(tmp_path / "o")
    shapes = dict(zip(ds.index["path"], (ds[i][0].shape for i in range(len(ds))), strict=True))
    assert shapes == {"a/near_square.jpg": (100, 100, 3), "a/square.jpg": (100, 100, 3)}


def test_a_size_mismatch_on_unchanged_bytes_is_not_called_a_change(tmp_path: Path):
    root = tmp_path / "x"
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.jpg").write_bytes(jpeg_bytes(gradient_rgb(40, 30)))
    manifest, _ = ingest(root, FolderLayout(), IngestOptions(workers=1))
    manifest, _ = split(manifest, ["a"], SplitOptions(valid_pct=0.0))
    manifest["width"] = 41  # what ingest recorded disagrees; the bytes are ingest's
    with pytest.raises(PresizeError) as e:
        write_shards(
            PresizeJob(str(root), manifest, ("a",), PresizeOptions(size=10)), tmp_path / "o"
        )
    msg = str(e.value)
    assert "the file changed" not in msg and "rerun the pipeline from ingest" not in msg
    assert "a/one.jpg: decoder mismatch: the bytes are ingest's" in msg
    assert "header says 40x30 now but ingest recorded 41x30" in msg


def test_decoded_size_problem_names_what_differs():
    assert decoded_size_problem((250, 250), (499, 500), (499, 500)) is None
    assert decoded_size_problem((63, 63), (499, 500), (499, 500)) is None  # 1/8, rounded up
    assert decoded_size_problem((62, 63), (499, 500), (499, 500)) == (
        "it decoded to 62x63, which is not 499x500 at any DCT scale (1, 1/2, 1/4, 1/8)"
    )
    assert decoded_size_problem((499, 500), (500, 499), (499, 500)) == (
        "its header says 500x499 now but ingest recorded 499x500"
    )
