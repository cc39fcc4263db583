"""evaluate: the final (mixup) checkpoint on the validation side of the large presize, then
fastai's ClassificationInterpretation of its predictions."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate, interpret


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
                ["metrics", "validation_predictions"],
                name="evaluate",
            ),
            Node(
                interpret,
                ["validation_predictions", "mixup.checkpoint", "params:interpret"],
                "interpretation",
                name="interpret",
            ),
        ]
    )
