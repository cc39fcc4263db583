"""The parameters' schema: every parameter file (and ``--params``) checked once, at the start.

One pydantic model per block of ``conf/*/parameters*.yml``, each field with the constraint it
must meet; unknown keys are errors (a typo such as ``epoch:`` would otherwise be ignored and the
default silently used). :func:`check_parameters` raises :class:`ParameterError` naming every
bad key, its value and what is allowed; ``ParametersHooks`` (settings.py) calls it when the
Kedro context is created, before any node runs. The ``vision`` dataclasses stay the library's
own types: a test keeps each block's keys equal to its dataclass's fields.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cassava_pipeline.vision import allocator

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
# Lightning Fabric's names (lightning_fabric.connector); tpu/mps are valid names that fail at
# run time where the device is absent, as Fabric reports them.
Accelerator = Literal["auto", "cpu", "cuda", "gpu", "mps", "tpu"]
Precision = Literal[
    "32-true",
    "32",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
]


class ParameterError(ValueError):
    """Parameters that cannot run: every problem, one line each, and what to do."""


class Block(BaseModel):
    """A block of parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- data ---------------------------------------------------------------------------------------


class CsvLayoutParams(Block):
    file: str
    image_dir: str
    image_column: str
    label_column: str
    valid_column: str | None = None
    label_map: str | None = None


class FolderLayoutParams(Block):
    train_folder: str | None  # null: a folder per class at the top, never split folders
    valid_folder: str


class RegexLayoutParams(Block):
    image_dir: str
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as e:
            raise ValueError(f"not a regular expression ({e})") from e
        if compiled.groups < 1:
            raise ValueError("needs a group, (...), that captures the class name")
        return value


class IngestParams(Block):
    layout: Literal["csv", "folder", "regex"]
    csv: CsvLayoutParams
    folder: FolderLayoutParams
    regex: RegexLayoutParams
    max_excluded_fraction: Fraction
    max_image_pixels: PositiveInt
    workers: NonNegativeInt
    chunk_size: PositiveInt
    report_path: str = "data/08_reporting/data_report.json"  # named in messages


class SplitParams(Block):
    valid_pct: Annotated[float, Field(gt=0.0, lt=1.0)]
    seed: int
    use_layout_split: bool
    keep_conflicting_duplicates: bool = False


class PresizeParams(Block):
    size: Annotated[int, Field(ge=8)]
    workers: NonNegativeInt
    shard_mb: PositiveInt
    chunk_size: PositiveInt
    max_image_pixels: PositiveInt
    jpeg_draft: bool
    encoding: Literal["raw", "jpeg"]
    jpeg_quality: Annotated[int, Field(ge=1, le=100)]


class PresizeBlock(Block):
    presize: PresizeParams


class DataParams(Block):
    raw: str | None = None  # a folder of the user's own images (README, "Your own images")

    @field_validator("raw")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_dir():
            raise ValueError("is not a folder")
        return value


class SampleParams(Block):
    n_images: PositiveInt
    width: Annotated[int, Field(ge=8)]
    height: Annotated[int, Field(ge=8)]
    n_test_images: NonNegativeInt
    seed: int
    workers: NonNegativeInt


# ---- model and training -------------------------------------------------------------------------


class ModelParams(Block):
    arch: str
    weights: str
    hidden: NonNegativeInt
    ps: Annotated[float, Field(ge=0.0, lt=1.0)]
    concat_pool: bool
    seed: int

    @field_validator("arch")
    @classmethod
    def _known(cls, value: str) -> str:
        from cassava_pipeline.vision.models import architecture_problem  # noqa: PLC0415

        problem = architecture_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _weights(self) -> ModelParams:
        from cassava_pipeline.vision.models import PACKAGED_ARCH  # noqa: PLC0415

        if self.weights == "packaged" and self.arch != PACKAGED_ARCH:
            raise ValueError(
                f"weights: packaged exist only for {PACKAGED_ARCH}, not {self.arch}; use "
                "imagenet (downloaded once), none, or a file"
            )
        builtin = self.weights in ("imagenet", "packaged", "none")
        if not builtin and not Path(self.weights).expanduser().is_file():
            raise ValueError(
                f"weights {self.weights!r} is neither imagenet, packaged, none nor an existing file"
            )
        return self


class KeepParams(Block):
    entries: NonNegativeInt
    max_gib: PositiveFloat


class RuntimeParams(Block):
    accelerator: Accelerator
    devices: PositiveInt
    num_nodes: PositiveInt
    strategy: str
    precision: Precision
    progress: bool
    malloc: Literal["tuned", "default"] = allocator.DEFAULT_MODE
    keep: KeepParams

    @model_validator(mode="after")
    def _half_needs_cuda(self) -> RuntimeParams:
        if self.accelerator == "cpu" and self.precision in ("16-mixed", "16-true"):
            raise ValueError(
                f"precision {self.precision} needs CUDA; on a CPU use 32-true or bf16-mixed"
            )
        return self


class LrFindParams(Block):
    start_lr: PositiveFloat
    end_lr: PositiveFloat
    num_it: Annotated[int, Field(ge=2)]
    stop_div: bool
    beta: Annotated[float, Field(ge=0.0, lt=1.0)]
    always: bool = False  # sweep even when no stage uses lr: auto (for the plot)

    @model_validator(mode="after")
    def _range(self) -> LrFindParams:
        if self.end_lr <= self.start_lr:
            raise ValueError(f"end_lr ({self.end_lr}) must exceed start_lr ({self.start_lr})")
        return self


class OneCycleParams(Block):
    div: PositiveFloat
    div_final: PositiveFloat
    pct_start: Fraction
    moms: Annotated[list[Fraction], Field(min_length=3, max_length=3)]


class LoaderParams(Block):
    batch_size: PositiveInt
    num_workers: NonNegativeInt
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: PositiveInt


class AugmentParams(Block):
    min_scale: Annotated[float, Field(gt=0.0, le=1.0)]
    crop: Literal["batch", "sample"]
    resample: Literal["once", "twice"]
    do_flip: bool
    p_flip: Fraction
    max_rotate: NonNegativeFloat
    min_zoom: PositiveFloat
    max_zoom: PositiveFloat
    max_warp: Annotated[float, Field(ge=0.0, lt=1.0)]
    p_affine: Fraction
    max_lighting: Annotated[float, Field(ge=0.0, lt=1.0)]
    p_lighting: Fraction
    mult: NonNegativeFloat
    pad_mode: Literal["reflection", "zeros", "border"]
    align_corners: bool

    @model_validator(mode="after")
    def _zoom(self) -> AugmentParams:
        if self.max_zoom < self.min_zoom:
            raise ValueError(f"max_zoom ({self.max_zoom}) is below min_zoom ({self.min_zoom})")
        return self


class TrainParams(Block):
    name: str
    epochs: NonNegativeInt  # 0: the stage is skipped, its checkpoint passed on unchanged
    lr: str | float | list[float]
    freeze: bool
    size: Annotated[int, Field(ge=8)]
    wd: NonNegativeFloat
    mixup: NonNegativeFloat
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)]
    monitor: Literal["accuracy", "valid_loss", "last"]
    grad_accum: PositiveInt
    channels_last: bool
    compile: bool
    seed: int
    validate_before: bool
    optimizer_state: Literal["fastai", "reset"]
    one_cycle: OneCycleParams
    loader: LoaderParams
    augment: AugmentParams

    @field_validator("lr", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Any:
        """``auto``, one rate, or fastai's slice as ``[high]`` or ``[low, high]``."""
        allowed = "auto, a rate > 0, [high] or [low, high] (fastai's slice)"
        if value == "auto":
            return value
        rates = value if isinstance(value, list | tuple) else [value]
        if not 1 <= len(rates) <= 2 or not all(_positive_number(r) for r in rates):
            raise ValueError(f"must be {allowed}")
        if isinstance(value, list | tuple):
            if len(rates) == 2 and float(rates[0]) > float(rates[1]):
                raise ValueError(f"[low, high] needs low <= high ({allowed})")
            return [float(r) for r in rates]
        return float(value)


def _positive_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


class StageBlock(Block):
    train: TrainParams


# ---- evaluation and prediction ------------------------------------------------------------------


class TtaParams(Block):
    n: PositiveInt
    beta: Fraction
    use_max: bool
    seed: int


class InterpretParams(Block):
    predictions: Literal["tta", "plain"]
    top_k: NonNegativeInt
    min_val: PositiveInt
    show_batch: NonNegativeInt


class PredictParams(Block):
    images: str | None = None  # the catalog's predict_images reads it (--params=predict.images)
    tta: bool
    batch_size: PositiveInt
    workers: NonNegativeInt
    chunk_size: PositiveInt


class Parameters(Block):
    """Every parameter of the project, as ``conf/base`` and the environments give them."""

    data: DataParams = DataParams()
    run_name: str | None = None  # the MLflow run's name; default: made from what differs
    sample_data: SampleParams
    ingest: IngestParams
    split: SplitParams
    small: PresizeBlock
    large: PresizeBlock
    model: ModelParams
    runtime: RuntimeParams
    lr_find: LrFindParams
    frozen: StageBlock
    unfrozen: StageBlock
    mixup: StageBlock
    tta: TtaParams
    interpret: InterpretParams
    predict: PredictParams


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model of the block at ``loc`` (for the names an unknown key may mean)."""
    model: Any = Parameters
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _line(error: dict[str, Any]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))
    key = ".".join(str(p) for p in loc)
    value = error.get("input")
    kind = error["type"]
    if kind == "extra_forbidden":
        block = _model_at(loc[:-1])
        names = list(block.model_fields) if block else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = f" (known: {', '.join(names)})" if names and not close else ""
        return f"{key}: unknown key{hint}{known}"
    if kind == "missing":
        return f"{key}: missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key} = {value!r}: {message}"


def check_parameters(params: dict[str, Any]) -> Parameters:
    """The parameters, checked; :class:`ParameterError` lists every problem at once.

    Top-level keys that start with ``_`` (YAML anchors such as ``_train_defaults``) are not
    parameters and are left out.
    """
    given = {k: v for k, v in params.items() if not str(k).startswith("_")}
    try:
        return Parameters.model_validate(given)
    except ValidationError as e:
        lines = list(dict.fromkeys(_line(err) for err in e.errors()))
        raise ParameterError(
            "Parameters that cannot run (conf/<env>/parameters*.yml or --params):\n  "
            + "\n  ".join(lines)
            + "\nFix them and run again; conf/base/parameters*.yml says what each key does."
        ) from None
