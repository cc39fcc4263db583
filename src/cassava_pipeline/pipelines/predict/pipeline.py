"""cassava_predict: the exported model (or the fold ensemble, ``predict.model``) on a folder of
unlabeled images (Kaggle's test_images/)."""

from kedro.pipeline import Node, Pipeline

from .nodes import predict_images


def create_pipeline(**kwargs) -> Pipeline:
    """One node: probabilities, submission.csv and a report of the images left out."""
    return Pipeline(
        [
            Node(
                predict_images,
                [
                    "predict_model",
                    "predict_images",
                    "params:predict",
                    "params:tta",
                    "params:runtime",
                ],
                ["test_predictions", "submission", "predict_report"],
                name="predict_images",
            )
        ]
    )
