"""evaluate: the final (mixup) checkpoint on the validation side of the large presize."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate


def create_pipeline(**kwargs) -> Pipeline:
    """TTA evaluation of the last stage's best epoch."""
    return Pipeline(
        [
            Node(
                evaluate,
                [
                    "mixup.checkpoint",
                    "large.presized_images",
                    "params:mixup.train",
                    "params:tta",
                    "params:runtime",
                ],
                "metrics",
                name="evaluate",
            )
        ]
    )
