"""sample_data: `kedro run --pipelines=sample_data`; `make run` calls it on an empty raw folder."""

from kedro.pipeline import Node, Pipeline

from .nodes import generate_sample


def create_pipeline(**kwargs) -> Pipeline:
    """One node writing train.csv, the label map, the images and the unlabeled test images
    through the catalog."""
    return Pipeline(
        [
            Node(
                generate_sample,
                inputs="params:sample_data",
                outputs=[
                    "sample_train_csv",
                    "sample_label_map",
                    "sample_images",
                    "sample_submission_csv",
                    "sample_test_images",
                ],
                name="generate_sample",
            )
        ]
    )
