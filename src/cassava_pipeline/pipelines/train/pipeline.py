"""train: init_model -> lr_find -> one training pipeline under three namespaces.

frozen   (presize ``small``): head only, ``lr: auto`` takes lr_find's suggestion;
unfrozen (presize ``large``): everything, discriminative rates, from frozen's checkpoint;
mixup    (presize ``large``): as unfrozen with MixUp, keeping the best epoch by accuracy.

The last stage's best epoch is then exported as a self-describing model (``exported_model``).
"""

from kedro.pipeline import Node, Pipeline

from .nodes import export_model, find_lr, init_model, train_stage

# namespace -> (presized images it trains on, checkpoint it starts from)
STAGES = {
    "frozen": ("small.presized_images", "initial_checkpoint"),
    "unfrozen": ("large.presized_images", "frozen.checkpoint"),
    "mixup": ("large.presized_images", "unfrozen.checkpoint"),
}


def training_stage() -> Pipeline:
    """The one parameterised training node every stage reuses."""
    return Pipeline(
        [
            Node(
                train_stage,
                inputs=[
                    "start_checkpoint",
                    "presized_images",
                    "lr_find_result",
                    "resume_dir",
                    "params:train",
                    "params:runtime",
                ],
                outputs=["checkpoint", "history"],
                name="train_stage",
            )
        ]
    )


def recipe(small: str = "small.presized_images", large: str = "large.presized_images") -> Pipeline:
    """lr_find, the three namespaced training stages and the export, on the shard sets named
    ``small`` and ``large``, from ``initial_checkpoint`` (also the recipe of each
    cross-validation fold, on its fold's views)."""
    shards = {"small.presized_images": small, "large.presized_images": large}
    sweep = Pipeline(
        [
            Node(
                find_lr,
                [
                    "initial_checkpoint",
                    shards["small.presized_images"],
                    "lr_find_resume_dir",  # the sweep is kept and reused while its inputs hold
                    "params:frozen.train",
                    "params:lr_find",
                    "params:runtime",
                    *(f"params:{ns}.train" for ns in STAGES),  # skipped unless one uses auto
                ],
                "lr_find_result",
                name="lr_find",
            ),
        ]
    )
    stages = [
        Pipeline(
            training_stage(),
            namespace=ns,
            inputs={
                "start_checkpoint": start,
                "presized_images": shards.get(images, images),
                "lr_find_result": "lr_find_result",
            },
            parameters={"params:runtime": "params:runtime"},
        )
        for ns, (images, start) in STAGES.items()
    ]
    final, (final_images, _) = list(STAGES.items())[-1]
    export = Pipeline(
        [
            Node(
                export_model,
                [
                    f"{final}.checkpoint",
                    "data_report",
                    f"params:{final}.train",
                    f"params:{final_images.split('.')[0]}.presize",
                ],
                ["exported_model", "mlflow_model"],
                name="export_model",
            )
        ]
    )
    return sweep + sum(stages, Pipeline([])) + export


def initial() -> Pipeline:
    """The pretrained body with a fresh head: the checkpoint every recipe starts from."""
    return Pipeline(
        [Node(init_model, ["data_report", "params:model"], "initial_checkpoint", name="init_model")]
    )


def create_pipeline(**kwargs) -> Pipeline:
    """Model initialisation, lr_find, the three namespaced training stages, the export."""
    return initial() + recipe()
