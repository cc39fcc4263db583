"""Ingest: the three layouts, every bad-input case, and the exclusion threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cassava_pipeline.vision.ingest import (
    MANIFEST_COLUMNS,
    IngestError,
    IngestOptions,
    check_exclusions,
    ingest,
)
from cassava_pipeline.vision.layouts import CsvLayout, FolderLayout, LayoutError, RegexLayout
from tests.images import gradient_rgb, jpeg_bytes, write_jpeg

SERIAL = IngestOptions(workers=1)


def reasons(report: dict) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in report["excluded"]}


def test_csv_layout_clean(kaggle_dir: Path):
    manifest, report = ingest(kaggle_dir, CsvLayout(), SERIAL)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 18 and report["n_excluded"] == 0
    assert [c["name"] for c in report["classes"]] == ["alpha", "beta", "gamma"]
    assert [c["source_id"] for c in report["classes"]] == ["0", "1", "2"]
    row = manifest.set_index("path").loc["train_images/1002.jpg"]
    assert (row["label"], row["label_name"], row["width"], row["height"]) == (1, "beta", 40, 30)
    assert manifest["is_valid"].isna().all()  # no is_val column
    assert report["size"]["most_common"] == "40x30"


def test_csv_layout_bad_inputs_are_listed_with_reasons(kaggle_dir: Path):
    imgs = kaggle_dir / "train_images"
    (imgs / "0000.jpg").write_bytes(b"")  # zero bytes
    good = (imgs / "0001.jpg").read_bytes()
    (imgs / "0001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (imgs / "0002.jpg").write_text("not an image at all")  # text named .jpg
    (imgs / "0003.jpg").write_bytes(np.random.default_rng(0).bytes(2000))  # random bytes
    table = pd.read_csv(kaggle_dir / "train.csv")
    extra = pd.DataFrame(
        [("missing.jpg", 0), ("1000.jpg", 7), ("1001.jpg", 1), ("1002.jpg", None)],
        columns=["image_id", "label"],
    )
    pd.concat([table, extra]).to_csv(kaggle_dir / "train.csv", index=False)

    manifest, report = ingest(kaggle_dir, CsvLayout(), SERIAL)
    got = reasons(report)
    assert got["train_images/0000.jpg"] == "empty file"
    assert got["train_images/0001.jpg"] == "truncated image"
    assert got["train_images/0002.jpg"] == "not an image"
    assert got["train_images/0003.jpg"] == "not an image"
    assert got["train_images/missing.jpg"] == "missing file"
    assert got["train_images/1000.jpg"] == "unknown label"
    assert got["train_images/1001.jpg"] == "duplicate row"
    assert got["train_images/1002.jpg"] == "missing label"
    assert report["n_listed"] == 22 and report["n_excluded"] == 8 and len(manifest) == 14
    assert report["excluded_by_reason"]["not an image"] == 2
    assert "train_images/0000.jpg" not in set(manifest["path"])


def test_threshold_stops_with_count_files_and_reasons(kaggle_dir: Path):
    (kaggle_dir / "train_images" / "0000.jpg").write_bytes(b"")
    _, report = ingest(kaggle_dir, CsvLayout(), SERIAL)
    assert report["excluded_fraction"] == pytest.approx(1 / 18)
    check_exclusions(report, IngestOptions(max_excluded_fraction=0.1))  # 5.6% is within 10%
    with pytest.raises(IngestError) as e:
        gpu = IngestOptions(report_path="data/08_reporting/gpu/data_report.json")
        check_exclusions(report, gpu)
    msg = str(e.value)
    assert "The data report (data/08_reporting/gpu/data_report.json) lists every file" in msg
    assert "1 of 18" in msg and "5.6%" in msg
    assert "train_images/0000.jpg: empty file" in msg and "max_excluded_fraction" in msg


def test_empty_class_is_left_out_and_reported(kaggle_dir: Path):
    table = pd.read_csv(kaggle_dir / "train.csv")
    table[table["label"] != 1].to_csv(kaggle_dir / "train.csv", index=False)
    manifest, report = ingest(kaggle_dir, CsvLayout(), SERIAL)
    assert report["empty_classes"] == ["beta"]
    assert [(c["name"], c["index"]) for c in report["classes"]] == [("alpha", 0), ("gamma", 1)]
    assert sorted(manifest["label"].unique()) == [0, 1]


def test_csv_is_val_column_and_label_names(tmp_path: Path):
    root = tmp_path / "d"
    for i in range(4):
        write_jpeg(root / "imgs" / f"{i}.png", seed=i)
    pd.DataFrame(
        {
            "image_id": [f"{i}.png" for i in range(4)],
            "label": ["cat", "dog", "cat", "dog"],
            "is_val": [False, False, True, "True"],
        }
    ).to_csv(root / "labels.csv", index=False)
    layout = CsvLayout(file="labels.csv", image_dir="imgs", label_map=None)
    manifest, report = ingest(root, layout, SERIAL)
    assert report["has_split"] is True
    assert manifest["is_valid"].tolist() == [False, False, True, True]
    assert manifest["label_name"].tolist() == ["cat", "dog", "cat", "dog"]


def test_csv_missing_column_names_the_fix(kaggle_dir: Path):
    with pytest.raises(LayoutError, match="image_column"):
        ingest(kaggle_dir, CsvLayout(image_column="file"), SERIAL)


def test_folder_layout_with_train_and_valid(tmp_path: Path):
    root = tmp_path / "clothes"
    for side in ("train", "valid"):
        for cls in ("hat", "shoe"):
            for j in range(2):
                write_jpeg(root / side / cls / f"{j}.jpg", seed=j)
    (root / "train" / "scarf").mkdir()  # empty class folder
    (root / "train" / "hat" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "README.txt").write_text("stray file")
    manifest, report = ingest(root, FolderLayout(), SERIAL)
    assert [c["name"] for c in report["classes"]] == ["hat", "shoe"]
    assert report["empty_classes"] == ["scarf"]
    assert manifest.groupby("is_valid").size().to_dict() == {False: 4, True: 4}
    assert reasons(report) == {"train/README.txt": "not in a class folder"}
    assert report["ignored_hidden_files"] == ["train/hat/.DS_Store"]


@pytest.mark.parametrize("valid_name", ["val", "validation", "Valid"])
def test_folder_layout_recognises_the_usual_validation_names(tmp_path: Path, valid_name: str):
    """A train/ + val/ set (torchvision's ImageFolder sets): val/ is the validation side, not a
    class, and test/ is left out; the report and the log say so."""
    root = tmp_path / "set"
    for side in ("train", valid_name, "test"):
        for cls in ("ants", "bees"):
            write_jpeg(root / side / cls / f"{side}.jpg", seed=len(side) + len(cls))
    manifest, report = ingest(root, FolderLayout(), SERIAL)
    assert [c["name"] for c in report["classes"]] == ["ants", "bees"]
    assert report["has_split"] is True
    assert manifest.groupby("is_valid").size().to_dict() == {False: 2, True: 2}
    assert not manifest["path"].str.startswith("test/").any()
    notes = report["layout_notes"]
    assert notes[0].startswith(f"validation folder: {valid_name}/")
    assert "left out: test/ (a test folder is not training data)" in notes


def test_folder_layout_train_alone_is_split_at_random(tmp_path: Path):
    for cls in ("ants", "bees"):
        write_jpeg(tmp_path / "train" / cls / "a.jpg")
    manifest, report = ingest(tmp_path, FolderLayout(), SERIAL)
    assert [c["name"] for c in report["classes"]] == ["ants", "bees"]
    assert manifest["is_valid"].isna().all() and report["has_split"] is False
    assert "split at random" in report["layout_notes"][0]


def test_split_folders_without_train_stop_the_run(tmp_path: Path):
    """val/ and test/ at the top without train/ would become two classes: a clear stop."""
    for side in ("val", "test"):
        write_jpeg(tmp_path / side / "ants" / "a.jpg")
    with pytest.raises(LayoutError, match=r"named like split folders \(test, val\).*train_folder"):
        ingest(tmp_path, FolderLayout(), SERIAL)
    # ... unless they are classes indeed: train_folder null reads the top level as classes
    manifest, report = ingest(tmp_path, FolderLayout(train_folder=None), SERIAL)
    assert [c["name"] for c in report["classes"]] == ["test", "val"] and len(manifest) == 2


def test_folder_layout_flat(tmp_path: Path):
    for cls in ("b", "a"):
        write_jpeg(tmp_path / cls / "x.jpg")
    manifest, report = ingest(tmp_path, FolderLayout(), SERIAL)
    assert [c["name"] for c in report["classes"]] == ["a", "b"]  # sorted, as fastai's vocab
    assert manifest["is_valid"].isna().all()


def test_regex_layout_pets(tmp_path: Path):
    for name in ("Maine_Coon_157.jpg", "Maine_Coon_2.jpg", "german_shorthaired_12.jpg"):
        write_jpeg(tmp_path / "images" / name)
    write_jpeg(tmp_path / "images" / "nolabel.jpg")
    manifest, report = ingest(tmp_path, RegexLayout(), SERIAL)
    assert manifest["label_name"].tolist() == ["Maine_Coon", "Maine_Coon", "german_shorthaired"]
    assert reasons(report) == {"images/nolabel.jpg": "label pattern did not match"}


def test_odd_modes_are_accepted(tmp_path: Path):
    d = tmp_path / "x" / "cls"
    d.mkdir(parents=True)
    Image.fromarray(gradient_rgb(8, 8)).convert("L").save(d / "l.png")
    Image.fromarray(gradient_rgb(8, 8)).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(gradient_rgb(8, 8)).convert("P").save(d / "p.gif")
    Image.fromarray(gradient_rgb(8, 8)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(d / "16.png")
    (d / "webp.webp").write_bytes(b"")
    Image.fromarray(gradient_rgb(8, 8)).save(d / "w.webp")
    manifest, report = ingest(tmp_path / "x", FolderLayout(), SERIAL)
    assert len(manifest) == 6 and reasons(report) == {"cls/webp.webp": "empty file"}
    assert set(report["modes"]) >= {"L", "RGBA", "P", "CMYK"}


def test_unusual_formats_and_modes_are_named(tmp_path: Path):
    """A GIF placeholder among JPEG photos: the manifest has format and mode columns, the
    report and the warning name the file, not just a count."""
    from cassava_pipeline.vision.ingest import unusual_lines

    d = tmp_path / "x" / "ants"
    for i in range(4):
        write_jpeg(d / f"{i}.jpg", seed=i)
    Image.fromarray(gradient_rgb(8, 8)).convert("P").save(d / "placeholder.jpg", format="GIF")
    Image.fromarray(gradient_rgb(8, 8)).convert("L").save(d / "grey.jpg", format="JPEG")
    manifest, report = ingest(tmp_path / "x", FolderLayout(), SERIAL)
    by_path = manifest.set_index("path")[["format", "mode"]].to_dict("index")
    assert by_path["ants/placeholder.jpg"] == {"format": "GIF", "mode": "P"}
    assert by_path["ants/0.jpg"] == {"format": "JPEG", "mode": "RGB"}
    assert report["unusual_files"] == [
        {"path": "ants/grey.jpg", "format": "JPEG", "mode": "L"},
        {"path": "ants/placeholder.jpg", "format": "GIF", "mode": "P"},
    ]
    (line,) = unusual_lines(report)
    assert "2 file(s) in an unusual format or mode" in line
    assert "ants/placeholder.jpg (GIF, P)" in line and "ants/grey.jpg (JPEG, L)" in line


def test_missing_root_says_what_to_do(tmp_path: Path):
    """Advice for every kind of user: their own folder, the sample, Kaggle's data."""
    with pytest.raises(LayoutError) as e:
        ingest(tmp_path / "nope", CsvLayout(), SERIAL)
    msg = str(e.value)
    assert "data.raw=/path/to/images" in msg and "make run" in msg and "--env=kaggle" in msg


def test_parallel_equals_serial(kaggle_dir: Path):
    (kaggle_dir / "train_images" / "0004.jpg").write_bytes(b"xx")
    a, ra = ingest(kaggle_dir, CsvLayout(), SERIAL)
    b, rb = ingest(kaggle_dir, CsvLayout(), IngestOptions(workers=2, chunk_size=2))
    pd.testing.assert_frame_equal(a, b)
    assert ra == rb


def test_duplicates_are_counted(kaggle_dir: Path):
    imgs = kaggle_dir / "train_images"
    (imgs / "0005.jpg").write_bytes((imgs / "1005.jpg").read_bytes())
    _, report = ingest(kaggle_dir, CsvLayout(), SERIAL)
    assert report["duplicate_files"] == 1
    assert json.loads(json.dumps(report)) == report  # JSON-serialisable as is


def test_large_exif_rotated_image_size(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 8
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "r.jpg").write_bytes(jpeg_bytes(gradient_rgb(60, 20), exif=exif.tobytes()))
    manifest, _ = ingest(tmp_path, FolderLayout(), SERIAL)
    assert (manifest["width"].iat[0], manifest["height"].iat[0]) == (20, 60)


def test_the_node_logs_each_exclusion_with_its_reason_and_detail_apart(kaggle_dir: Path, caplog):
    import logging

    import yaml

    from cassava_pipeline.pipelines.ingest.nodes import ingest_images
    from tests.images import REPO

    params = yaml.safe_load((REPO / "conf" / "base" / "parameters_ingest.yml").read_text())
    params["ingest"]["workers"] = 1
    (kaggle_dir / "train_images" / "0000.jpg").write_bytes(b"")
    caplog.set_level(logging.INFO, logger="cassava_pipeline.pipelines.ingest.nodes")
    ingest_images(kaggle_dir, params["ingest"])
    assert "excluded train_images/0000.jpg: empty file (0 bytes)" in caplog.text
