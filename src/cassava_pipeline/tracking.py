"""MLflow tracking around the recipe: live epoch metrics, run tags, and the model as a pyfunc.

kedro-mlflow owns the run (one per ``kedro run``; parameters, metric and artifact datasets);
this module adds what a training loop has to log itself, while it runs:

- :class:`EpochLogger`: train_loss, valid_loss, accuracy and lr after every epoch, at step =
  the global epoch across the three stages, so the MLflow UI draws curves while a long run is
  still going. It is picklable (it travels into Fabric's spawned processes) and never fails the
  training.
- :func:`run_tags`: git commit and dirty flag, lock file hash, torch, CUDA and device.
- :class:`CassavaPyfunc`: the exported model as an MLflow pyfunc taking image paths or bytes.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import register_dataset_source
from mlflow.entities import Metric
from mlflow.pyfunc import PythonModel
from mlflow.tracking import MlflowClient

from cassava_pipeline.fallback import active_mirror
from cassava_pipeline.vision.integrity import file_sha256
from cassava_pipeline.vision.predict import Classifier
from cassava_pipeline.vision.provenance import versions

logger = logging.getLogger(__name__)

EPOCH_METRICS = ("train_loss", "valid_loss", "accuracy", "lr")
FOLD_TAG = "cv_fold"  # a cross-validation fold's child run (hooks/fold_runs.py): its fold
TRACKED_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "lightning-fabric",
    "kedro",
    "kedro-mlflow",
    "mlflow",
    "numpy",
    "pillow",
    "scikit-learn",
)


def active_run_id() -> str | None:
    """The id of MLflow's active run in this process (kedro-mlflow starts one), or None."""
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def fold_run_id(parent_id: str, fold: str) -> str | None:
    """The child run of ``parent_id`` that records cross-validation fold ``fold``, or None."""
    try:
        experiment_id = mlflow.get_run(parent_id).info.experiment_id
        runs = MlflowClient().search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' "
            f"and tags.`{FOLD_TAG}` = '{fold}'",
            max_results=1,
        )
    except Exception:  # tracking never fails the training: the fold logs into the parent
        return None
    return runs[0].info.run_id if runs else None


@dataclass
class EpochLogger:
    """Logs a training stage's epoch rows to one MLflow run, at step ``offset + epoch``.

    The run is in the local store (:mod:`cassava_pipeline.fallback`); in the main process each
    epoch is then pushed to the tracking server the run is mirrored to, if any. A spawned
    training process (``devices: N``) logs to the local store too. Logging never fails the
    training: a store that cannot be written gets one warning and no more calls.
    """

    tracking_uri: str
    run_id: str
    offset: int
    prefix: str = ""  # before each metric's name ("fold_2/": a fold logging into the parent)
    disabled: bool = field(default=False)
    main_pid: int = field(default_factory=os.getpid)

    @classmethod
    def for_active_run(cls, offset: int, fold: str = "") -> EpochLogger | None:
        """For the active run; a cross-validation fold's epochs go to the fold's child run
        (:mod:`cassava_pipeline.hooks.fold_runs`), or under ``<fold>/`` names in the active
        run where the fold has none."""
        run_id = active_run_id()
        if run_id is None:
            return None
        uri, offset = mlflow.get_tracking_uri(), int(offset)
        if not fold:
            return cls(uri, run_id, offset)
        child = fold_run_id(run_id, fold)
        return cls(uri, child, offset) if child else cls(uri, run_id, offset, f"{fold}/")

    def _log(self, rows: list[dict[str, Any]]) -> None:
        if self.disabled or not rows:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(self.prefix + key, float(row[key]), now, self.offset + int(row["epoch"]))
            for row in rows
            for key in EPOCH_METRICS
            if key in row and row[key] is not None and math.isfinite(float(row[key]))
        ]
        try:
            MlflowClient(tracking_uri=self.tracking_uri).log_batch(self.run_id, metrics=metrics)
        except Exception as e:
            self.disabled = True
            logger.warning(
                "MLflow could not record epoch metrics in %s (%s: %s); training goes on and "
                "saves its checkpoints, but the remaining epoch metrics of this run are not "
                "logged",
                self.tracking_uri,
                type(e).__name__,
                e,
            )
            return
        mirror = active_mirror()
        if mirror is not None and mirror.run_id == self.run_id and os.getpid() == self.main_pid:
            mirror.push("logging epoch metrics")

    def __call__(self, row: dict[str, Any]) -> None:
        self._log([row])

    def log_missing(self, history: pd.DataFrame) -> int:
        """Log the epochs of ``history`` the run does not have yet (a resumed or reused stage
        trained them in an earlier run); returns how many."""
        if history.empty:
            return 0
        try:
            there = MlflowClient(tracking_uri=self.tracking_uri).get_metric_history(
                self.run_id, self.prefix + "accuracy"
            )
            logged = {m.step for m in there}
        except Exception:
            logged = set()
        rows = [
            r for r in history.to_dict("records") if self.offset + int(r["epoch"]) not in logged
        ]
        self._log(rows)
        return len(rows)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def frame_hash(frame: pd.DataFrame) -> str:
    """A content hash of a table (the manifest: every image's path, label and content hash)."""
    rows = pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()
    cols = "\x1f".join(map(str, frame.columns)).encode()
    return hashlib.sha256(cols + rows).hexdigest()


# MLflow 3 opens an experiment on the view its kind names: the runs table for model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def run_name(params: dict[str, Any], env: str) -> str:
    """The MLflow run's name: ``run_name`` when given (``--params=run_name=...``), else what
    tells runs apart: environment, architecture, image sizes, epochs per stage and model seed,
    e.g. ``local tf_efficientnet_lite0 128/160px 3+2+2ep seed42``."""
    given = params.get("run_name")
    if given:
        return str(given)
    try:
        stages = [params[s]["train"] for s in ("frozen", "unfrozen", "mixup")]
        sizes = "/".join(dict.fromkeys(str(p["size"]) for p in stages if int(p["epochs"]) > 0))
        epochs = "+".join(str(p["epochs"]) for p in stages)
        model = params["model"]
        return f"{env} {model['arch']} {sizes or '-'}px {epochs}ep seed{model['seed']}"
    except (KeyError, TypeError):  # parameters of another shape (tests): the environment alone
        return env


class ImageFolderSource(DatasetSource):
    """An image folder on this machine, as the source of a logged MLflow dataset.

    A plain path string would be resolved by MLflow's registry, where two sources claim local
    paths and every run warns "can be interpreted in multiple ways"; an explicit source says what
    it is. Registered, so ``mlflow.data.get_source`` reads it back from a run."""

    def __init__(self, uri: str) -> None:
        self._uri = uri

    @property
    def uri(self) -> str:
        return self._uri

    @staticmethod
    def _get_source_type() -> str:
        return "image_folder"

    def load(self, dst_path: str | None = None) -> str:
        return self._uri  # already local: the folder itself

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # only ever passed explicitly, never guessed from a string

    @classmethod
    def _resolve(cls, raw_source: Any) -> ImageFolderSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self._uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> ImageFolderSource:
        return cls(source_dict["uri"])


register_dataset_source(ImageFolderSource)

# MLflow hints, for any schema with integer columns, that integers cannot hold missing values at
# serving time. That concerns a model signature's enforcement; these tables are only recorded
# (the model's signature is written out in full in mlflow_model.py), so it says nothing to act on.
_INTEGER_HINT = "Hint: Inferred schema contains integer column"


def log_data_inputs(split_manifest: pd.DataFrame, source: str, name: str) -> None:
    """The training and validation sides of the split as MLflow dataset inputs of the active run,
    each with its content digest: the runs table's Dataset column shows which data a run saw."""
    for valid, context in ((False, "training"), (True, "validation")):
        side = split_manifest[split_manifest["is_valid"] == valid].reset_index(drop=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_INTEGER_HINT)
            dataset = mlflow.data.from_pandas(
                side,
                source=ImageFolderSource(source),
                name=f"{name}-{'valid' if valid else 'train'}",
                digest=frame_hash(side)[:16],
                targets="label" if "label" in side.columns else None,
            )
            mlflow.log_input(dataset, context=context)


def run_tags(project_path: Path, accelerator: str = "auto") -> dict[str, str]:
    """Provenance tags of a run: code, environment and device."""
    project_path = Path(project_path)
    lock = project_path / "requirements.lock"
    commit = _git(["rev-parse", "HEAD"], project_path)
    status = _git(["status", "--porcelain", "--untracked-files=no"], project_path)
    wants_cuda = accelerator in ("auto", "cuda", "gpu")
    on_cuda = wants_cuda and torch.cuda.is_available()
    tags = {
        "git_commit": commit or "unknown (not a git checkout)",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "lock_hash": file_sha256(lock) if lock.is_file() else "missing",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "device": torch.cuda.get_device_name(0) if on_cuda else f"cpu ({os.cpu_count()} cores)",
        "python_version": platform.python_version(),
    }
    tags.update({f"version.{name}": v for name, v in versions(TRACKED_PACKAGES).items()})
    return tags


# ---- the model as an MLflow pyfunc ----------------------------------------------------------


def _as_image(value: Any) -> str | bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    text = str(value)
    if text.startswith("base64:"):
        return base64.b64decode(text[len("base64:") :])
    return text


class CassavaPyfunc(PythonModel):
    """MLflow pyfunc around the exported model (artifact ``model``: the safetensors file).

    Input: a DataFrame with an ``image`` column of file paths, encoded image bytes, or strings
    ``base64:<encoded image>`` (what JSON over HTTP can carry), or a list of those. Output: one
    row per input with ``label`` (the source's label id), ``class_name``, ``probability``, one
    ``p_<label>`` per class, and ``error`` (why an image could not be read; its label is empty).
    """

    def load_context(self, context) -> None:
        self.classifier = Classifier.load(context.artifacts["model"])

    # pandas in and out: MLflow validates against the logged signature (a DataFrame hint infers
    # no schema of its own), and without hints it warns at every save and load
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            column = "image" if "image" in model_input.columns else model_input.columns[0]
            values = model_input[column].tolist()
        else:
            values = list(model_input)
        images = [_as_image(v) for v in values]
        names = [str(i) for i in range(len(images))]
        out = self.classifier.predict(images, names=names)
        table = out.table().set_index("image_id")
        errors = dict(out.errors)
        rows = []
        for name in names:
            if name in table.index:
                rows.append({**table.loc[name].to_dict(), "error": ""})
            else:
                rows.append({"label": "", "class_name": "", "error": errors.get(name, "")})
        frame = pd.DataFrame(rows)
        return frame[["label", "class_name", "probability", *self._p_columns(), "error"]]

    def _p_columns(self) -> list[str]:
        return [f"p_{c}" for c in self.classifier.card.class_ids]
