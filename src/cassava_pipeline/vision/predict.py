"""Predict classes of new images with an exported model, plainly or with fastai's TTA.

Each image goes through what its validation counterpart went through in training: decoded and
oriented, presized (shorter side, with the same DCT scaling), centre-cropped to a square and
resized to the model's image size; TTA replays the training crops and augmentations instead.
An image that cannot be read is reported with its reason and gets no prediction.

    from cassava_pipeline.vision.predict import Classifier
    clf = Classifier.load("data/06_models/model.safetensors")
    out = clf.predict(["leaf1.jpg", "leaf2.png"])
    out.labels, out.probabilities, out.errors
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .data import LoaderOptions
from .export import ExportedEnsemble, ExportedModel, check_members, load_model_file
from .images import ImageError, read_bytes
from .parallel import chunked, ordered_map, resolve_workers
from .presize import presize_bytes
from .tta import TtaOptions, predict, tta

ImageInput = str | Path | bytes


class DecodedImages:
    """Presized images held in memory, read as :class:`~.shards.ShardedImages` items are."""

    def __init__(self, images: Sequence[np.ndarray], size: int):
        self._images, self._size = list(images), int(size)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self._images[i], 0  # unlabeled


@dataclass(frozen=True)
class Predictions:
    """Probabilities of the images that could be read, and the reasons for the others."""

    names: list[str]  # of the predicted images, in input order
    probabilities: np.ndarray  # (len(names), n_classes)
    errors: list[tuple[str, str]]  # (name, reason) of each image left out
    classes: tuple[str, ...]
    class_ids: tuple[str, ...]

    @property
    def indices(self) -> np.ndarray:
        return self.probabilities.argmax(1) if len(self.names) else np.zeros(0, dtype=np.int64)

    @property
    def labels(self) -> list[str]:
        """Predicted class names."""
        return [self.classes[i] for i in self.indices]

    @property
    def label_ids(self) -> list[str]:
        """Predicted labels in the source's ids (Kaggle's 0..4)."""
        return [self.class_ids[i] for i in self.indices]

    def table(self) -> pd.DataFrame:
        """One row per predicted image: name, label id, class name, its probability, then one
        probability column per class (``p_<class id>``)."""
        probs = self.probabilities.reshape(len(self.names), len(self.classes))
        out = pd.DataFrame(
            {
                "image_id": self.names,
                "label": self.label_ids,
                "class_name": self.labels,
                "probability": probs.max(1) if len(self.names) else np.zeros(0),
            }
        )
        for j, cid in enumerate(self.class_ids):
            out[f"p_{cid}"] = probs[:, j]
        return out


def list_folder(folder: str | Path) -> list[str]:
    """Every entry under ``folder`` (Kaggle's ``test_images/``) a prediction must account for,
    relative and sorted, hidden ones skipped: files, links (dangling or looping ones too, which
    are then reported) and directories named like images; other folders are walked into.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the image folder {folder} does not exist; put the images to predict there or "
            "point the catalog entry predict_images at them"
        )
    suffixes = set(Image.registered_extensions())
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are not followed
        rel = Path(dirpath).relative_to(folder)
        walk = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if os.path.islink(os.path.join(dirpath, d)) or Path(d).suffix.lower() in suffixes:
                out.append((rel / d).as_posix())  # reported: a folder, not an image file
            else:
                walk.append(d)
        dirnames[:] = walk
        out += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(out)


def _decode_chunk(args: tuple) -> list[np.ndarray | tuple[str, str]]:
    items, names, size, max_pixels, draft = args
    out: list[np.ndarray | tuple[str, str]] = []
    for item, name in zip(items, names, strict=True):
        try:
            data = item if isinstance(item, bytes) else read_bytes(str(item))
            out.append(presize_bytes(data, size, max_pixels=max_pixels, draft=draft))
        except ImageError as e:
            out.append((name, str(e)))
    return out


class Classifier:
    """An exported model ready to predict image files or bytes."""

    def __init__(self, exported: ExportedModel, *, device: str | torch.device = "cpu"):
        self.card = exported.card
        self.device = torch.device(device)
        self.model = exported.build().to(self.device)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> Classifier:
        """The classifier of a model file: its model, or (a fold ensemble's file) its members
        averaged."""
        path = Path(path)
        return classifier(load_model_file(path.read_bytes(), source=str(path)), device=device)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.card.classes

    def decode(
        self, images: Sequence[ImageInput], names: Sequence[str], *, workers: int = 1
    ) -> tuple[list[str], list[np.ndarray], list[tuple[str, str]]]:
        """Presize ``images`` in memory: (names kept, arrays, (name, reason) of the others)."""
        c = self.card
        tasks = [
            (i, n, c.presize, c.max_image_pixels, c.jpeg_draft)
            for i, n in zip(chunked(images, 16), chunked(names, 16), strict=True)
        ]
        kept, arrays, errors = [], [], []
        results = ordered_map(_decode_chunk, tasks, workers=workers)
        for name, res in zip(names, (r for chunk in results for r in chunk), strict=True):
            if isinstance(res, tuple):
                errors.append(res)
            else:
                kept.append(name)
                arrays.append(res)
        return kept, arrays, errors

    def predict(
        self,
        images: Sequence[ImageInput],
        *,
        names: Sequence[str] | None = None,
        tta_options: TtaOptions | None = None,
        batch_size: int = 32,
        workers: int = 1,
        chunk_size: int = 512,
    ) -> Predictions:
        """Class probabilities of ``images`` (paths or encoded bytes).

        ``tta_options``: fastai's TTA (n augmented passes blended with the plain one); None:
        the plain prediction. ``workers``: decoding processes (0: all cores). Images are decoded
        ``chunk_size`` at a time, so memory stays bounded on a large folder.
        """
        images = list(images)
        if names is None:
            names = [
                f"<bytes #{i}>" if isinstance(x, bytes) else str(x) for i, x in enumerate(images)
            ]
        names = [str(n) for n in names]
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        workers = resolve_workers(workers)
        loader = LoaderOptions(batch_size=batch_size, num_workers=0, pin_memory=False)
        kept_all: list[str] = []
        probs_all: list[torch.Tensor] = []
        errors_all: list[tuple[str, str]] = []
        for part, part_names in zip(
            chunked(images, chunk_size), chunked(names, chunk_size), strict=True
        ):
            kept, arrays, errors = self.decode(part, part_names, workers=workers)
            errors_all += errors
            if not arrays:
                continue
            kept_all += kept
            probs_all.append(
                self.probabilities(DecodedImages(arrays, self.card.presize), loader, tta_options)
            )
        n_classes = len(self.card.classes)
        probabilities = (
            torch.cat(probs_all).numpy() if probs_all else np.zeros((0, n_classes), np.float32)
        )
        return Predictions(kept_all, probabilities, errors_all, self.classes, self.card.class_ids)

    def probabilities(
        self, decoded: DecodedImages, loader: LoaderOptions, tta_options: TtaOptions | None
    ) -> torch.Tensor:
        """This model's probabilities of decoded images: fastai's TTA, or the plain pass."""
        augment, stats = self.card.augment_options(), self.card.stats
        if tta_options is None:
            probs, _ = predict(
                self.model, decoded, stats, augment, loader, train_transforms=False,
                device=self.device,
            )  # fmt: skip
            return probs
        return tta(self.model, decoded, stats, augment, loader, tta_options, device=self.device)[
            "tta"
        ]


def classifier(
    model: ExportedModel | ExportedEnsemble, *, device: str | torch.device = "cpu"
) -> Classifier:
    """The classifier of a model file's content: one model, or an ensemble averaging its
    members' probabilities."""
    if isinstance(model, ExportedEnsemble):
        return Ensemble(model.members, device=device)
    return Classifier(model, device=device)


class Ensemble(Classifier):
    """Several exported models of one recipe (a cross-validation's folds) as one classifier:
    the images are decoded once, each model predicts them (with TTA when asked) and their
    probabilities are averaged."""

    def __init__(self, members: Sequence[ExportedModel], *, device: str | torch.device = "cpu"):
        check_members([m.card for m in members])
        self.members = [Classifier(m, device=device) for m in members]
        self.card = self.members[0].card
        self.device = torch.device(device)

    def probabilities(
        self, decoded: DecodedImages, loader: LoaderOptions, tta_options: TtaOptions | None
    ) -> torch.Tensor:
        return torch.stack(
            [m.probabilities(decoded, loader, tta_options) for m in self.members]
        ).mean(0)
