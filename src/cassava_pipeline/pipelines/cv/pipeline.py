"""cassava_cv: the recipe once per fold of a stratified k-fold over the training side.

``make_folds`` cuts the split's training side into ``cv.folds`` folds (the split's validation
side stays a held-out test); each fold is the namespace ``fold_<k>``, built by
:func:`fold_pipeline`: views of the shared shards with fold ``k`` as validation, then the whole
training recipe (lr_find, frozen, unfrozen, mixup, the export), the TTA evaluation of its
validation fold (that fold's out-of-fold predictions) and of the held-out side. ``kedro run
--pipelines=cassava_cv --namespaces=fold_2`` runs one fold alone (the folds, the shards and the
initial checkpoint are files; the other folds' outputs too). ``out_of_fold`` gathers the
out-of-fold predictions (CV accuracy, label issues), ``held_out_report`` scores each fold model
and their ensemble on the held-out side, ``export_ensemble`` writes the fold models as one file
that ``cassava_predict`` predicts with (``predict.model``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline, pipeline

from cassava_pipeline.pipelines import predict
from cassava_pipeline.pipelines.evaluate.nodes import evaluate
from cassava_pipeline.pipelines.train import pipeline as train
from cassava_pipeline.vision.folds import fold_name, fold_view
from cassava_pipeline.vision.label_issues import revised_view

from .nodes import (
    cv_summary,
    export_ensemble,
    held_out_predictions,
    held_out_report,
    label_issue_figure,
    make_folds,
    out_of_fold,
    revise_labels,
)

# What every fold reads unchanged: shared files, and the recipe's parameters.
CLEANED = "cleaned"  # the second round's namespace
SHARED = {
    "initial_checkpoint",
    "data_report",
    "small.presized_images",
    "large.presized_images",
}
PARAMETERS = {
    "params:lr_find",
    "params:runtime",
    "params:tta",
    "params:large.presize",
    *(f"params:{stage}.train" for stage in train.STAGES),
}


def _round(namespace: str, view: Callable, view_inputs: list[str], tail: list[Node]) -> Pipeline:
    """A training round in ``namespace``: ``view`` of each shard set (``<size>_view``, from the
    shard set and ``view_inputs``), the whole recipe on them, the TTA evaluation of the views'
    validation side, and ``tail``."""
    views = [
        Node(view, [f"{size}.presized_images", *view_inputs], f"{size}_view", name=f"{size}_view")
        for size in ("small", "large")
    ]
    final = list(train.STAGES)[-1]
    scored = Node(
        evaluate,
        [
            f"{final}.checkpoint",
            "large_view",
            f"params:{final}.train",
            "params:tta",
            "params:runtime",
        ],
        ["metrics", "validation_predictions", "final_metrics"],
        name="evaluate",
    )
    return Pipeline(
        Pipeline(views) + train.recipe("small_view", "large_view") + Pipeline([scored, *tail]),
        namespace=namespace,
        inputs=SHARED | set(view_inputs),
        parameters=PARAMETERS,
    )


def fold_pipeline(k: int) -> Pipeline:
    """Fold ``k``: its views of the shards, the recipe on them, the evaluation of its fold (its
    out-of-fold predictions) and of the held-out side."""
    final = list(train.STAGES)[-1]
    tested = Node(
        held_out_predictions,
        [
            f"{final}.checkpoint",
            "large.presized_images",  # its validation side: the held-out test
            "cv_folds",
            f"params:{final}.train",
            "params:tta",
            "params:runtime",
        ],
        "held_out_predictions",
        name="held_out_predictions",
    )
    view = update_wrapper(partial(fold_view, fold=k), fold_view)  # the other folds train
    return _round(fold_name(k), view, ["cv_folds"], [tested])


def clean_pipeline() -> Pipeline:
    """cassava_cv_clean: the second round. The suspects of the cross-validation's label issues
    kept, dropped or relabelled (``cv.label_issues``); the recipe on all training images so
    revised (namespace ``cleaned``), validated on the held-out side with its labels as given:
    its accuracy compares with a single-split run's on the same images."""
    revise = Node(
        revise_labels,
        ["cv_folds", "label_issues", "data_report", "params:cv"],
        "label_revision",
        name="revise_labels",
    )
    view = update_wrapper(partial(revised_view, name=""), revised_view)  # the run's own curves
    return Pipeline([revise]) + _round(CLEANED, view, ["label_revision"], [])


def create_pipeline(folds: int = 5, **kwargs) -> Pipeline:
    """The folds, ``folds`` namespaced recipes, and the out-of-fold report."""
    cut = Pipeline(
        [
            Node(
                make_folds,
                ["split_manifest", "data_report", "params:cv"],
                ["cv_folds", "cv_fold_report"],
                name="make_folds",
            )
        ]
    )
    gather = Pipeline(
        [
            Node(
                out_of_fold,
                [
                    "cv_folds",
                    "data_report",
                    "params:cv",
                    *(f"{fold_name(k)}.validation_predictions" for k in range(folds)),
                ],
                ["oof_predictions", "cv_metrics", "label_issues"],
                name="out_of_fold",
            ),
            Node(
                held_out_report,
                [
                    "data_report",
                    *(f"{fold_name(k)}.held_out_predictions" for k in range(folds)),
                ],
                "cv_held_out_metrics",
                name="held_out_report",
            ),
            Node(
                export_ensemble,
                [f"{fold_name(k)}.exported_model" for k in range(folds)],
                "cv_ensemble_model",
                name="export_ensemble",
            ),
            Node(
                cv_summary,
                ["cv_metrics", "cv_held_out_metrics"],
                "cv_final_metrics",
                name="cv_summary",
            ),
            Node(
                label_issue_figure,
                ["label_issues", "large.presized_images", "params:interpret"],
                "label_issues_plot",
                name="label_issue_figure",
            ),
        ]
    )
    return cut + sum((fold_pipeline(k) for k in range(folds)), Pipeline([])) + gather


def predict_pipeline() -> Pipeline:
    """cassava_cv_predict: ``cassava_predict`` with the fold ensemble (``cv_ensemble_model``) on
    a folder of new images (``predict.images``), its probabilities the mean of the folds' TTA
    probabilities, written apart from the single model's (``cv_submission``, ...)."""
    return pipeline(
        predict.create_pipeline(),
        inputs={"predict_model": "cv_ensemble_model"},
        outputs={
            "test_predictions": "cv_test_predictions",
            "submission": "cv_submission",
            "predict_report": "cv_predict_report",
        },
    )
