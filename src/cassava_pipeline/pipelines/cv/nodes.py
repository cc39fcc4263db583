"""Nodes of the cassava_cv pipeline: the folds, each fold's view of the shards, and what the
folds' out-of-fold predictions show together."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pandas as pd
from annotated_types import Ge, Gt, Lt
from matplotlib.figure import Figure
from scipy.stats import bootstrap

from cassava_pipeline.pipelines.evaluate.nodes import InterpretParams, score
from cassava_pipeline.validation import parse
from cassava_pipeline.vision.data import CroppedItems
from cassava_pipeline.vision.export import ExportedEnsemble, ExportedModel
from cassava_pipeline.vision.folds import (
    HELD_OUT,
    FoldOptions,
    assign_folds,
    fold_report,
)
from cassava_pipeline.vision.label_issues import LabelAction, label_issues
from cassava_pipeline.vision.label_issues import revise_labels as revise
from cassava_pipeline.vision.learner import RuntimeConfig, StageConfig
from cassava_pipeline.vision.metrics import classification_metrics
from cassava_pipeline.vision.plots import image_grid, short_name
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.tta import TtaOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CvParams(FoldOptions):
    """The folds, and how their accuracy's interval is estimated."""

    bootstrap: Annotated[int, Ge(100)] = 2000  # resamples of the out-of-fold images
    confidence: Annotated[float, Gt(0.5), Lt(1.0)] = 0.95  # the interval's level
    label_issues: LabelAction = "keep"  # the second round's suspects: keep, drop, relabel
    issue_limit: Annotated[int, Ge(0)] | None = None  # revise the first N suspects; None: all


def make_folds(
    split_manifest: pd.DataFrame, data_report: dict[str, Any], params: dict[str, Any]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Each image's fold (``-1``: the split's validation side, a held-out test), and the
    images per fold and class."""
    options = parse(CvParams, params)
    classes = [c["name"] for c in data_report["classes"]]
    folded, notes = assign_folds(split_manifest, classes, options)
    for line in notes:
        logger.warning("cv: %s", line)
    report = fold_report(folded, classes)
    logger.info(
        "cv: %d folds over %d training images; %d held out",
        report["folds"],
        int((folded["fold"] != HELD_OUT).sum()),
        report["held_out"],
    )
    return folded[["path", "label", "fold"]], report


def out_of_fold(
    cv_folds: pd.DataFrame,
    data_report: dict[str, Any],
    params: dict[str, Any],
    *fold_predictions: pd.DataFrame,
) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Every training image's TTA probabilities from the fold model that did not train on it
    (``image, label, p_0.., fold``), the CV accuracy (per fold, mean and spread, a bootstrap
    interval over the images) and cleanlab's suspected label issues among them."""
    options = parse(CvParams, params)
    classes = [c["name"] for c in data_report["classes"]]
    n = len(classes)
    parts = []
    for k, pred in enumerate(fold_predictions):
        probs = pred[[f"p_tta_{i}" for i in range(n)]].to_numpy()
        parts.append(
            pd.DataFrame({"image": pred["path"], "label": pred["actual"], "fold": k}).join(
                pd.DataFrame(probs, columns=[f"p_{i}" for i in range(n)])
            )
        )
    oof = pd.concat(parts, ignore_index=True)
    expected = cv_folds[cv_folds["fold"] != HELD_OUT].set_index("path")["fold"]
    got = oof.set_index("image")["fold"]
    if got.index.duplicated().any() or not got.sort_index().equals(expected.sort_index()):
        raise ValueError(
            "The folds' predictions do not cover each training image once, by the fold that "
            "validated it: the folds were cut again since; rerun every fold (kedro run "
            "--pipelines=cassava_cv)."
        )
    probs = oof[[f"p_{i}" for i in range(n)]].to_numpy()
    correct = (probs.argmax(1) == oof["label"].to_numpy()).astype(np.float64)
    per_fold = oof.assign(correct=correct).groupby("fold")["correct"].mean()
    interval = bootstrap(
        (correct,),
        np.mean,
        n_resamples=options.bootstrap,
        confidence_level=options.confidence,
        method="percentile",
        rng=np.random.default_rng(options.seed),
    ).confidence_interval
    metrics = {
        "folds": len(fold_predictions),
        "n_images": len(oof),
        "accuracy": float(correct.mean()),  # over every out-of-fold image
        "fold_accuracy": [float(a) for a in per_fold],
        "fold_accuracy_mean": float(per_fold.mean()),
        "fold_accuracy_std": float(per_fold.std(ddof=1)),
        "interval": [float(interval.low), float(interval.high)],
        "confidence": options.confidence,
    }
    issues = label_issues(oof["image"].tolist(), oof["label"].to_numpy(), probs, classes)
    metrics["label_issues"] = len(issues)
    logger.info(
        "cv: out-of-fold accuracy %.4f (%.0f%% interval %.4f to %.4f), folds %.4f +- %.4f; "
        "%d suspected label issue(s)",
        metrics["accuracy"],
        100 * options.confidence,
        *metrics["interval"],
        metrics["fold_accuracy_mean"],
        metrics["fold_accuracy_std"],
        len(issues),
    )
    return oof, metrics, issues


def revise_labels(
    cv_folds: pd.DataFrame,
    issues: pd.DataFrame,
    data_report: dict[str, Any],
    params: dict[str, Any],
) -> pd.DataFrame:
    """Every image's label for the second round (``path, label, is_valid, revision``): the
    suspects kept, dropped or relabelled as ``cv.label_issues`` says; the held-out side
    validates, as given."""
    options = parse(CvParams, params)
    action = options.label_issues
    classes = [c["name"] for c in data_report["classes"]]
    revision = revise(cv_folds, issues, classes, action, limit=options.issue_limit)
    counts = revision["revision"].value_counts()
    logger.info(
        "cv_clean: label issues %s (%s of %d suspects): %d of %d training images dropped, "
        "%d relabelled",
        action,
        "all" if options.issue_limit is None else f"the first {options.issue_limit}",
        len(issues),
        int(counts.get("dropped", 0)),
        int((~revision["is_valid"]).sum()),
        int(counts.get("relabelled", 0)),
    )
    return revision


def export_ensemble(*fold_models: ExportedModel) -> ExportedEnsemble:
    """The fold models as one file: ``cassava_predict`` averages their (TTA) probabilities
    (``--params=predict.model=<its path>``)."""
    return ExportedEnsemble(tuple(fold_models))


def held_out_predictions(
    checkpoint: dict[str, Any],
    presized_images: ShardedImages,
    cv_folds: pd.DataFrame,
    stage_params: dict[str, Any],
    tta_params: dict[str, Any],
    runtime_params: dict[str, Any],
) -> pd.DataFrame:
    """A fold model's predictions (plain and TTA) on the held-out side: the split's validation
    images, which no fold trained or validated on."""
    _, test = presized_images.split()
    held = set(cv_folds.loc[cv_folds["fold"] == HELD_OUT, "path"])
    if set(test.index["path"]) != held:
        raise ValueError(
            "The held-out images of the folds are not the shards' validation side: the folds "
            "were cut from another split; rerun make_folds (kedro run --pipelines=cassava_cv)."
        )
    if len(test) == 0:
        return pd.DataFrame(columns=["path", "actual"])
    cfg = parse(StageConfig, stage_params).trained_at(checkpoint)
    options = parse(TtaOptions, tta_params)
    _, predictions = score(checkpoint, test, cfg, options, parse(RuntimeConfig, runtime_params))
    return predictions


def held_out_report(data_report: dict[str, Any], *fold_predictions: pd.DataFrame) -> dict:
    """Accuracy on the held-out side of each fold model and of their ensemble (the mean of the
    folds' TTA probabilities, as a fold ensemble predicts)."""
    classes = [c["name"] for c in data_report["classes"]]
    if not fold_predictions or fold_predictions[0].empty:
        return {"n_images": 0, "note": "the split has no validation side to hold out"}
    first = fold_predictions[0]
    columns = [f"p_tta_{i}" for i in range(len(classes))]
    if any(not p["path"].equals(first["path"]) for p in fold_predictions):
        raise ValueError("The folds' held-out predictions are not of the same images in order")
    targets = first["actual"].to_numpy()
    per_fold = [
        classification_metrics(p[columns].to_numpy(), targets, classes)["accuracy"]
        for p in fold_predictions
    ]
    mean_probs = np.mean([p[columns].to_numpy() for p in fold_predictions], axis=0)
    ensemble = classification_metrics(mean_probs, targets, classes)
    report = {
        "n_images": len(first),
        "fold_accuracy": per_fold,
        "fold_accuracy_mean": float(np.mean(per_fold)),
        "ensemble_accuracy": ensemble["accuracy"],
        "ensemble": ensemble,
    }
    logger.info(
        "cv: held-out accuracy of the %d-fold ensemble %.4f; single folds %s (mean %.4f)",
        len(per_fold),
        report["ensemble_accuracy"],
        ", ".join(f"{a:.4f}" for a in per_fold),
        report["fold_accuracy_mean"],
    )
    return report


def cv_summary(cv_metrics: dict[str, Any], held_out: dict[str, Any]) -> dict[str, Any]:
    """What the folds show together, as the run's MLflow metrics (``cv.*``): the out-of-fold
    accuracy and its interval, the folds' spread, the label-issue count, and the held-out
    accuracy of the fold ensemble beside the mean single fold's."""
    low, high = cv_metrics["interval"]
    values = {
        "accuracy": cv_metrics["accuracy"],
        "accuracy_low": low,
        "accuracy_high": high,
        "fold_accuracy_mean": cv_metrics["fold_accuracy_mean"],
        "fold_accuracy_std": cv_metrics["fold_accuracy_std"],
        "label_issues": cv_metrics["label_issues"],
    }
    if held_out.get("n_images"):
        values["held_out_ensemble_accuracy"] = held_out["ensemble_accuracy"]
        values["held_out_fold_accuracy_mean"] = held_out["fold_accuracy_mean"]
    return {name: {"value": float(v), "step": 0} for name, v in values.items()}


def label_issue_figure(
    issues: pd.DataFrame, presized_images: ShardedImages, params: dict[str, Any]
) -> Figure:
    """The top suspects (``interpret.top_k`` of them), each with its given and suggested label
    and the self-confidence: the images to look at first."""
    top = issues.head(parse(InterpretParams, params).top_k)
    position = {p: i for i, p in enumerate(presized_images.index["path"])}
    crops = CroppedItems(presized_images, train=False, seed=0)
    return image_grid(
        [crops[(0, position[p])][0] for p in top["image"]],
        [
            f"given {short_name(g)} / suggested {short_name(s)} / {c:.2f}"
            for g, s, c in zip(
                top["given_label"], top["suggested_label"], top["self_confidence"], strict=True
            )
        ],
        title=f"Suspected label issues: {len(top)} of {len(issues)} (cleanlab, out-of-fold)",
    )
