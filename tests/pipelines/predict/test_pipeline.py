"""cassava_predict: a folder of new images in, Kaggle's submission and a report out."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from kedro.runner import SequentialRunner

from cassava_pipeline.pipeline_registry import register_pipelines
from tests.pipelines.conftest import make_catalog
from tests.training import exported


def test_predict_pipeline_skips_unreadable_images(test_images: Path, params, tmp_path: Path):
    out = tmp_path / "out"
    params["runtime"]["accelerator"] = "cpu"
    params["tta"]["n"] = 2
    params["predict"]["workers"] = 1
    catalog = make_catalog(tmp_path / "unused", params, out, predict_folder=test_images)
    catalog["exported_model"].save(exported())
    SequentialRunner().run(register_pipelines()["cassava_predict"], catalog)

    submission = pd.read_csv(out / "submission.csv", dtype=str)
    assert list(submission.columns) == ["image_id", "label"]
    assert submission["image_id"].tolist() == [
        "0.jpg",
        "1.jpg",
        "2.jpg",
        "palette.png",
        "rgba.png",
    ]
    assert submission["label"].isin(["0", "1", "2"]).all()
    probs = pd.read_csv(out / "test_predictions.csv")
    p = probs[["p_0", "p_1", "p_2"]].to_numpy()
    assert abs(p.sum(1) - 1).max() < 1e-5
    assert (p.argmax(1).astype(str) == submission["label"].to_numpy()).all()
    report = json.loads((out / "predict_report.json").read_text())
    assert (report["n_files"], report["n_predicted"], report["n_skipped"]) == (9, 5, 4)
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert skipped["corrupt.jpg"].startswith(("corrupt image", "truncated image", "not an image"))
    assert skipped["empty.jpg"].startswith("empty file")
    assert report["tta"] == {"n": 2, "beta": 0.25}
    assert sum(report["predicted_counts"].values()) == 5
    assert report["model"]["arch"] == "resnet18"


def test_predict_reports_every_entry_links_and_folders_included(
    test_images: Path, params, tmp_path: Path
):
    """n_files == predicted + skipped: nothing in the folder is left out silently."""
    (test_images / "loop_a.jpg").symlink_to(test_images / "loop_b.jpg")
    (test_images / "loop_b.jpg").symlink_to(test_images / "loop_a.jpg")
    (test_images / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (test_images / "folder.jpg").mkdir()  # a directory named like an image
    (test_images / "folder.jpg" / "inner.jpg").write_bytes((test_images / "0.jpg").read_bytes())
    (test_images / "sub").mkdir()  # a plain subfolder: walked into
    (test_images / "sub" / "deep.jpg").write_bytes((test_images / "1.jpg").read_bytes())
    (test_images / "link_to_good.jpg").symlink_to(test_images / "2.jpg")
    (test_images / "link_to_folder").symlink_to(test_images / "sub", target_is_directory=True)
    out = tmp_path / "out"
    params["runtime"]["accelerator"] = "cpu"
    params["predict"].update(workers=1, tta=False)
    catalog = make_catalog(tmp_path / "unused", params, out, predict_folder=test_images)
    catalog["exported_model"].save(exported())
    SequentialRunner().run(register_pipelines()["cassava_predict"], catalog)

    report = json.loads((out / "predict_report.json").read_text())
    assert report["n_files"] == report["n_predicted"] + report["n_skipped"] == 9 + 7
    predicted = pd.read_csv(out / "submission.csv")["image_id"].tolist()
    assert {"sub/deep.jpg", "link_to_good.jpg"} <= set(predicted) and len(predicted) == 7
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert skipped["loop_a.jpg"].startswith("symlink loop")
    assert skipped["loop_b.jpg"].startswith("symlink loop")
    assert (
        skipped["dangling.jpg"].startswith("dangling link")
        and "gone.jpg" in skipped["dangling.jpg"]
    )
    assert skipped["folder.jpg"].startswith("not a file") and "directory" in skipped["folder.jpg"]
    assert skipped["link_to_folder"].startswith("not a file")
    assert "folder.jpg/inner.jpg" not in skipped and "folder.jpg/inner.jpg" not in predicted
