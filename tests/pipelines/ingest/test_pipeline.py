"""ingest -> check -> split, and the whole data half with a SequentialRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.runner import SequentialRunner

from cassava_pipeline.pipelines import ingest, presize
from cassava_pipeline.pipelines.ingest.nodes import check_ingest, ingest_images, split_manifest
from cassava_pipeline.vision.ingest import IngestError
from tests.images import SHARED_DATASETS
from tests.pipelines.conftest import make_catalog


def test_nodes_chain(kaggle_dir: Path, params):
    (kaggle_dir / "train_images" / "0000.jpg").write_bytes(b"GIF89a broken")
    candidates, report = ingest_images(kaggle_dir, params["ingest"])
    assert report["excluded_by_reason"] == {"not an image": 1}
    with pytest.raises(IngestError, match="1 of 18"):
        check_ingest(candidates, report, params["ingest"])
    params["ingest"]["max_excluded_fraction"] = 0.1
    manifest = check_ingest(candidates, report, params["ingest"])
    split, split_report = split_manifest(manifest, report, params["split"])
    assert split_report["n_train"] + split_report["n_valid"] == 17
    assert split["is_valid"].dtype == bool


def test_ingest_to_presize_sequential_runner(kaggle_dir: Path, params, tmp_path: Path):
    params["small"]["presize"]["size"] = 16
    params["large"]["presize"]["size"] = 24
    catalog = make_catalog(kaggle_dir, params, tmp_path / "out")
    pipe = ingest.create_pipeline() + presize.create_pipeline()
    SequentialRunner().run(pipe, catalog)
    small = catalog["small.presized_images"].load()
    large = catalog["large.presized_images"].load()
    assert (small.size, large.size) == (16, 24)  # two presizes side by side
    assert len(small) == len(large) == 18
    assert small[0][0].shape == (16, 21, 3) and large[0][0].shape == (24, 32, 3)
    report = catalog["split_report"].load()
    assert [(c["train"], c["valid"]) for c in report["classes"]] == [(5, 1)] * 3
    assert catalog["data_report"].load()["n_images"] == 18


KAGGLE5 = SHARED_DATASETS / "cassava-kaggle5"


@pytest.mark.skipif(not KAGGLE5.is_dir(), reason="../shared/datasets/cassava-kaggle5 is absent")
def test_kaggle5_missing_rows_are_reported_and_stop_the_run(params, tmp_path: Path):
    catalog = make_catalog(KAGGLE5, params, tmp_path / "out")
    with pytest.raises(IngestError) as e:
        SequentialRunner().run(ingest.create_pipeline(), catalog)
    msg = str(e.value)
    assert "21,392 of 21,397" in msg and "missing file" in msg
    assert "max_excluded_fraction=0.01" in msg and "data_report.json" in msg
    # The report was saved before the run stopped, and lists every missing file.
    report = catalog["data_report"].load()
    assert report["n_images"] == 5
    assert report["excluded_by_reason"] == {"missing file": 21_392}
    assert len(report["excluded"]) == 21_392
    assert sorted(c["count"] for c in report["classes"]) == [1, 1, 1, 1, 1]
    assert report["size"]["most_common"] == "800x600"


@pytest.mark.skipif(not KAGGLE5.is_dir(), reason="../shared/datasets/cassava-kaggle5 is absent")
def test_kaggle5_loads_when_the_threshold_allows(params, tmp_path: Path):
    params["ingest"]["max_excluded_fraction"] = 1.0
    params["small"]["presize"]["size"] = 64
    catalog = make_catalog(KAGGLE5, params, tmp_path / "out")
    SequentialRunner().run(ingest.create_pipeline() + presize.create_pipeline(), catalog)
    shards = catalog["small.presized_images"].load()
    assert len(shards) == 5 and shards[0][0].shape == (64, 85, 3)
    assert shards.classes[3] == "Cassava Mosaic Disease (CMD)"
