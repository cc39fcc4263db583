"""A self-describing model file: safetensors weights plus a JSON model card in its header.

The card holds everything needed to rebuild the network and feed it images the way it was
trained: architecture and head, class names and the source's label ids (Kaggle's 0..4),
normalisation statistics, presize and image size, the augmentations TTA replays, and the recipe
version. Loading reads tensors and JSON only: safetensors cannot hold code, so loading a model
never unpickles anything (unlike ``torch.load`` of a pickled module). The header also holds the
sha256 of the weights (:func:`.integrity.content_sha256`), checked on every load: a damaged file
is refused, never predicted with.

    from cassava_pipeline.vision.export import load_exported
    model, card = load_exported("data/06_models/model.safetensors")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .augment import AugmentOptions
from .images import DEFAULT_MAX_PIXELS
from .integrity import content_sha256
from .models import Stats, create_model

MODEL_FORMAT = "cassava-pipeline/model-v2"  # v2: the header holds the weights' sha256
# several models of one recipe in one file (a cross-validation's folds): each member's card and
# weights' sha256 in the header, its tensors under "<member>." names
ENSEMBLE_FORMAT = "cassava-pipeline/ensemble-v1"
# what an ensemble's members must share: the classes, and one decoding of the images for all
ENSEMBLE_SHARED = ("classes", "class_ids", "presize", "max_image_pixels", "jpeg_draft")
_REEXPORT = (
    "Do not use it; export it again (kedro run --pipelines=train, or dvc repro train; a fold "
    "ensemble: kedro run --pipelines=cassava_cv --nodes=export_ensemble, or dvc repro "
    "cv_report) or restore it (dvc pull)"
)
# One header key: safetensors writes its metadata map in no fixed order, so two keys would make
# two saves of the same model differ byte for byte.
_HEADER_KEY = "cassava_pipeline"


class ExportError(ValueError):
    """A file that is not a model this package exported; the message says what is wrong."""


@dataclass(frozen=True)
class ModelCard:
    """What a model file says about itself."""

    arch: str  # timm or torchvision architecture of the body
    classes: tuple[str, ...]  # class names in output order
    class_ids: tuple[str, ...]  # the source's label for each class (Kaggle's "0".."4")
    mean: tuple[float, float, float]  # normalisation of [0, 1] pixels, per channel
    std: tuple[float, float, float]
    image_size: int  # side of the square the model sees (the last stage's aug size)
    presize: int  # shorter side images are resized to first (the last stage's presize)
    recipe_version: str
    hidden: int = 512  # fastai head
    ps: float = 0.5
    concat_pool: bool = True
    jpeg_draft: bool = True  # presize decoded large JPEGs with DCT scaling (cards before issue 28)
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    augment: dict[str, Any] = field(default_factory=dict)  # AugmentOptions replayed by TTA
    stage: str = ""  # the training stage the weights come from
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (data hash, epochs, ...)

    @property
    def stats(self) -> Stats:
        return Stats(tuple(self.mean), tuple(self.std))

    def augment_options(self) -> AugmentOptions:
        """The training augmentations at ``image_size`` (TTA's transforms, and the resize)."""
        # cards written before ``resample`` existed were trained (and replay TTA) with one resample
        return AugmentOptions(**{"resample": "once", **self.augment, "size": self.image_size})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        d = dict(d)
        for key in ("classes", "class_ids", "mean", "std"):
            d[key] = tuple(d[key])
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ExportError(f"model card has unknown fields {unknown}; upgrade cassava-pipeline")
        return cls(**d)


@dataclass(frozen=True)
class ExportedModel:
    """A model card and the weights (a flat dict of tensors) of ``nn.Sequential(body, head)``."""

    card: ModelCard
    weights: dict[str, torch.Tensor]

    def _entry(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors as saved, and the card and their sha256 for the header."""
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.weights.items()}
        return tensors, {"model_card": asdict(self.card), "weights_sha256": content_sha256(tensors)}

    def to_bytes(self) -> bytes:
        tensors, entry = self._entry()
        return _save(tensors, {"format": MODEL_FORMAT, **entry})

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "model") -> ExportedModel:
        """The model in a file's bytes, its weights verified against the sha256 in its header."""
        header = _card_header(data, source, MODEL_FORMAT)
        return cls._verified(header, _tensors(data, source), source)

    @classmethod
    def _verified(
        cls, entry: dict[str, Any], weights: dict[str, torch.Tensor], source: str
    ) -> ExportedModel:
        card = ModelCard.from_dict(entry["model_card"])
        actual = content_sha256(weights)
        if actual != entry.get("weights_sha256"):
            raise ExportError(
                f"{source} is damaged: its weights do not match the sha256 in its header "
                f"(recorded {entry.get('weights_sha256')}, now {actual}). {_REEXPORT}"
            )
        return cls(card, weights)

    def build(self) -> torch.nn.Sequential:
        """The network with these weights, in eval mode (no download: weights ``none``)."""
        c = self.card
        model, _ = create_model(
            c.arch, len(c.classes), "none", hidden=c.hidden, ps=c.ps, concat_pool=c.concat_pool
        )
        model.load_state_dict(self.weights)
        return model.eval()


@dataclass(frozen=True)
class ExportedEnsemble:
    """Several exported models of one recipe (a cross-validation's fold models), saved as one
    safetensors file: predicting with it averages their probabilities. Every member's weights
    are verified against their sha256 on load, as a single model's are."""

    members: tuple[ExportedModel, ...]

    def __post_init__(self) -> None:
        check_members([m.card for m in self.members])

    @property
    def card(self) -> ModelCard:
        """The first member's card: the classes, presize and decoding all members share."""
        return self.members[0].card

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for i, member in enumerate(self.members):
            weights, entry = member._entry()
            tensors.update({f"{i}.{k}": v for k, v in weights.items()})
            entries.append(entry)
        return _save(tensors, {"format": ENSEMBLE_FORMAT, "members": entries})

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "ensemble") -> ExportedEnsemble:
        header = _card_header(data, source, ENSEMBLE_FORMAT)
        tensors = _tensors(data, source)
        members = []
        for i, entry in enumerate(header.get("members") or []):
            prefix = f"{i}."
            weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            members.append(ExportedModel._verified(entry, weights, f"{source} (member {i})"))
        if not members or sum(len(m.weights) for m in members) != len(tensors):
            raise ExportError(f"{source} is damaged: its tensors are not its members'. {_REEXPORT}")
        return cls(tuple(members))


def check_members(cards: list[ModelCard]) -> None:
    """Models that can predict as one ensemble: at least one, sharing :data:`ENSEMBLE_SHARED`."""
    if not cards:
        raise ExportError("an ensemble needs at least one model")
    for card in cards[1:]:
        differs = [k for k in ENSEMBLE_SHARED if getattr(card, k) != getattr(cards[0], k)]
        if differs:
            raise ExportError(
                f"the ensemble's models differ in {', '.join(differs)}: they must come from "
                "one cross-validation run (kedro run --pipelines=cassava_cv)"
            )


def load_model_file(data: bytes, *, source: str = "model") -> ExportedModel | ExportedEnsemble:
    """A model file's bytes as the single model or the ensemble it holds."""
    meta = _header(data, source).get("__metadata__") or {}
    try:
        kind = json.loads(meta[_HEADER_KEY]).get("format")
    except (KeyError, ValueError, AttributeError):
        kind = None  # not ours: ExportedModel says what it expected
    return (ExportedEnsemble if kind == ENSEMBLE_FORMAT else ExportedModel).from_bytes(
        data, source=source
    )


def _save(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> bytes:
    return st_save(tensors, metadata={_HEADER_KEY: json.dumps(header, sort_keys=True)})


def _tensors(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types on damaged data
        raise ExportError(f"{source} is damaged ({e}). {_REEXPORT}") from None


def _header(data: bytes, source: str) -> dict[str, Any]:
    if len(data) < 8:
        raise ExportError(f"{source} is not a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ExportError(f"{source} is not a safetensors file (bad header length {n})")
    try:
        return json.loads(data[8 : 8 + n])
    except ValueError as e:  # e.g. flipped bytes inside the header
        raise ExportError(f"{source} is not a readable safetensors file ({e}). {_REEXPORT}") from e


def _card_header(data: bytes, source: str, expected: str) -> dict[str, Any]:
    meta = _header(data, source).get("__metadata__") or {}
    try:
        header = json.loads(meta[_HEADER_KEY])
    except (KeyError, ValueError):
        header = {}
    if header.get("format") != expected:
        how = (
            "export it with `kedro run --pipelines=cassava` (node export_model)"
            if expected == MODEL_FORMAT
            else "make it with `kedro run --pipelines=cassava_cv` (node export_ensemble)"
        )
        raise ExportError(
            f"{source} is format {header.get('format')!r}, expected {expected!r}: {how}"
        )
    return header


def read_card(data: bytes, *, source: str = "model") -> ModelCard:
    """The model card of a model file's bytes, without loading the weights."""
    return ModelCard.from_dict(_card_header(data, source, MODEL_FORMAT)["model_card"])


def export_checkpoint(
    checkpoint: dict[str, Any],
    *,
    class_ids: list[str],
    augment: AugmentOptions,
    presize: int,
    jpeg_draft: bool = False,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    extra: dict[str, Any] | None = None,
) -> ExportedModel:
    """Turn a training checkpoint (see ``init_model``) into a self-describing model."""
    opts = asdict(augment)
    size = int(opts.pop("size"))
    card = ModelCard(
        arch=str(checkpoint["arch"]),
        classes=tuple(checkpoint["classes"]),
        class_ids=tuple(str(c) for c in class_ids),
        mean=tuple(float(v) for v in checkpoint["mean"]),
        std=tuple(float(v) for v in checkpoint["std"]),
        image_size=size,
        presize=int(presize),
        recipe_version=str(checkpoint["recipe_version"]),
        hidden=int(checkpoint["hidden"]),
        ps=float(checkpoint["ps"]),
        concat_pool=bool(checkpoint["concat_pool"]),
        jpeg_draft=bool(jpeg_draft),
        max_image_pixels=int(max_image_pixels),
        augment=opts,
        stage=str(checkpoint.get("stage", "")),
        extra=dict(extra or {}),
    )
    if len(card.class_ids) != len(card.classes):
        raise ExportError(f"{len(card.class_ids)} class ids for {len(card.classes)} classes")
    return ExportedModel(card, dict(checkpoint["model"]))


def load_exported(path: str | Path) -> tuple[torch.nn.Sequential, ModelCard]:
    """The network (eval mode) and the card of a model file."""
    path = Path(path)
    exported = ExportedModel.from_bytes(path.read_bytes(), source=str(path))
    return exported.build(), exported.card
