"""evaluate: the final (mixup) checkpoint on the validation side of the large presize, then
fastai's ClassificationInterpretation of its predictions."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate, interpret, plot_report


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
                ["metrics", "validation_predictions", "final_metrics"],
                name="evaluate",
            ),
            Node(
                interpret,
                ["validation_predictions", "mixup.checkpoint", "params:interpret"],
                "interpretation",
                name="interpret",
            ),
            Node(
                plot_report,
                [
                    "interpretation",
                    "large.presized_images",
                    "mixup.checkpoint",
                    "lr_find_result",
                    "frozen.history",
                    "unfrozen.history",
                    "mixup.history",
                    "params:mixup.train",
                    "params:interpret",
                ],
                [
                    "confusion_matrix_plot",
                    "top_losses_plot",
                    "training_curves_plot",
                    "lr_find_plot",
                    "show_batch_plot",
                ],
                name="plot_report",
            ),
        ]
    )
