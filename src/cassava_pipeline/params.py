"""Every parameter checked once, at the start of a run, against the types the nodes use.

:class:`Parameters` is the whole of ``conf/*/parameters*.yml``: each block is the dataclass its
node parses (``vision``'s ``StageConfig``, ``PresizeOptions``, ..., or a node module's own block
such as ``InterpretParams``), so the types, bounds and defaults are stated once, there.
:func:`check_parameters` raises :class:`ParameterError` naming every bad key, its value and what
is allowed; ``ParametersHooks`` calls it when the Kedro context is created, before any node runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cassava_pipeline.pipelines.cv.nodes import CvParams
from cassava_pipeline.pipelines.evaluate.nodes import InterpretParams
from cassava_pipeline.pipelines.predict.nodes import PredictParams
from cassava_pipeline.pipelines.train.nodes import LrFindParams
from cassava_pipeline.validation import ParameterError, parse
from cassava_pipeline.vision.ingest import IngestOptions
from cassava_pipeline.vision.learner import RuntimeConfig, StageConfig
from cassava_pipeline.vision.models import ModelOptions
from cassava_pipeline.vision.options import STRICT, OptionError
from cassava_pipeline.vision.presize import PresizeOptions
from cassava_pipeline.vision.sample import SampleOptions
from cassava_pipeline.vision.split import SplitOptions
from cassava_pipeline.vision.tta import TtaOptions

__all__ = ["ParameterError", "Parameters", "check_parameters"]


@dataclass(frozen=True)
class DataParams:
    """Where the images come from (the catalog's ``raw_images`` reads it)."""

    __pydantic_config__ = STRICT

    raw: str | None = None  # a folder of the user's own images (README, "Your own images")

    def __post_init__(self) -> None:
        if self.raw is not None and not Path(self.raw).expanduser().is_dir():
            raise OptionError("raw", self.raw, "is not a folder", "data")


@dataclass(frozen=True)
class PresizeBlock:
    __pydantic_config__ = STRICT

    presize: PresizeOptions


@dataclass(frozen=True)
class StageBlock:
    __pydantic_config__ = STRICT

    train: StageConfig


@dataclass(frozen=True)
class Parameters:
    """Every parameter of the project, as ``conf/base`` and the environments give them."""

    __pydantic_config__ = STRICT

    sample_data: SampleOptions
    ingest: IngestOptions
    split: SplitOptions
    small: PresizeBlock
    large: PresizeBlock
    model: ModelOptions
    runtime: RuntimeConfig
    lr_find: LrFindParams
    frozen: StageBlock
    unfrozen: StageBlock
    mixup: StageBlock
    tta: TtaOptions
    interpret: InterpretParams
    predict: PredictParams
    cv: CvParams = field(default_factory=CvParams)
    data: DataParams = field(default_factory=DataParams)
    run_name: str | None = None  # the MLflow run's name; default: made from what differs


def check_parameters(params: dict[str, Any]) -> Parameters:
    """The parameters, checked; :class:`ParameterError` lists every problem at once.

    Top-level keys that start with ``_`` (YAML anchors such as ``_train_defaults``) are not
    parameters and are left out.
    """
    return parse(Parameters, {k: v for k, v in params.items() if not str(k).startswith("_")})
