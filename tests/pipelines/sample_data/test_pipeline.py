"""sample_data: writes Kaggle's layout, which ingest then reads without a single exclusion."""

from __future__ import annotations

from pathlib import Path

from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import CSVDataset
from kedro_datasets.partitions import PartitionedDataset

from cassava_pipeline.pipelines.sample_data import create_pipeline
from cassava_pipeline.pipelines.sample_data.nodes import generate_sample
from cassava_pipeline.vision.ingest import IngestOptions, ingest
from cassava_pipeline.vision.layouts import CsvLayout


def test_node_outputs_kaggle_tables():
    table, label_map, images, submission, test_images = generate_sample(
        {"n_images": 10, "width": 80, "height": 60, "seed": 1, "n_test_images": 6}
    )
    assert len(table) == 10 and set(images) == {i[:-4] for i in table["image_id"]}
    # Kaggle's sample_submission.csv lists the unlabeled test images, none of them a train image
    assert list(submission.columns) == ["image_id", "label"] and len(submission) == 6
    assert set(test_images) == {i[:-4] for i in submission["image_id"]}
    assert not set(submission["image_id"]) & set(table["image_id"])
    assert test_images[submission["image_id"].iat[0][:-4]]().size == (80, 60)
    assert label_map["4"] == "Healthy"
    first = images[table["image_id"].iat[0][:-4]]()
    assert first.size == (80, 60) and first.mode == "RGB"


def test_pipeline_writes_a_layout_ingest_accepts(tmp_path: Path, base_params):
    root = tmp_path / "cassava_sample"
    catalog = DataCatalog(
        {
            "sample_train_csv": CSVDataset(
                filepath=str(root / "train.csv"), save_args={"index": False}
            ),
            "sample_label_map": JSONDataset(filepath=str(root / "label_num_to_disease_map.json")),
            "sample_images": PartitionedDataset(
                path=str(root / "train_images"),
                dataset={"type": "pillow.ImageDataset", "save_args": {"quality": 90}},
                filename_suffix=".jpg",
            ),
            "sample_submission_csv": CSVDataset(
                filepath=str(root / "sample_submission.csv"), save_args={"index": False}
            ),
            "sample_test_images": PartitionedDataset(
                path=str(root / "test_images"),
                dataset={"type": "pillow.ImageDataset", "save_args": {"quality": 90}},
                filename_suffix=".jpg",
            ),
            "params:sample_data": MemoryDataset(
                {**base_params["sample_data"], "n_images": 12, "width": 160, "height": 120}
            ),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    manifest, report = ingest(root, CsvLayout(), IngestOptions(workers=1))
    assert report["n_excluded"] == 0 and len(manifest) == 12
    assert (
        len(list((root / "test_images").iterdir())) == base_params["sample_data"]["n_test_images"]
    )
    assert report["size"]["most_common"] == "160x120"
    assert [c["name"] for c in report["classes"]][3] == "Cassava Mosaic Disease (CMD)"
    first = sorted((root / "train_images").iterdir())[0].read_bytes()
    SequentialRunner().run(create_pipeline(), catalog)  # same seed: same bytes
    assert sorted((root / "train_images").iterdir())[0].read_bytes() == first
