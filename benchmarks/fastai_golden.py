"""Reference values computed by fastai itself, for tests that must not re-derive the formulas.

    make bench-env && .venv-bench/bin/python benchmarks/fastai_golden.py

Runs fastai 2.8.12 (benchmark environment only: fastai is never a dependency of the product) on
tiny models and fixed tensors, and writes ``tests/golden/<name>.json`` with the fastai version
and this script's name in each file. The tests compare ours with them to 1e-6; no fastai at test
time. What is recorded:

- ``one_cycle``: the learning rate of every parameter group and Adam's beta1 at every training
  step of real ``fit_one_cycle`` calls (several epochs, steps, pct_start, div, div_final, and
  lr as a number, ``slice(hi)`` and ``slice(lo, hi)``), and of a real ``fine_tune`` (its frozen
  and unfrozen cycles);
- ``lr_find``: real ``lr_find`` sweeps on tiny learners (several seeds): the recorded lrs and
  smoothed losses and the ``valley``, ``slide``, ``minimum`` and ``steep`` suggestions;
- ``losses``: ``LabelSmoothingCrossEntropy`` and ``MixUp``'s loss on fixed logits, targets,
  shuffle and lambda;
- ``tta``: ``Learner.tta``'s blend (mean and max, several beta) of fixed predictions;
- ``interpret``: ``ClassificationInterpretation``'s confusion matrix, ``most_confused`` and
  ``top_losses`` on fixed predictions;
- ``head``: ``create_head``'s layers and parameter count for several feature sizes;
- ``affine``: the matrix ``aug_transforms``' Flip, Rotate and Zoom compose (one AffineCoordTfm,
  as ``setup_aug_tfms`` merges them) for fixed draws of each (their ``draw`` arguments, p=1;
  neutral values stand for the masked-out items);
- ``pixels``: whole ``aug_transforms(size, min_scale=0.75)`` pipelines (flip, warp, rotate,
  zoom, brightness, contrast, ``RandomResizedCropGPU``, merged and ordered by ``setup_aug_tfms``
  and fastcore's ``Pipeline``) on fixed uint8 images, for fixed draws of each (p=1, neutral
  values for the masked-out items; the crop from a seeded ``random``, recorded), training and
  validation: 20 px to 16 (the clothing comparison's 1.25x) and 42 px to 20 (Kaggle's 460 to
  224, where fastai's ``_grid_sample`` area-shrinks before resizing);
- ``presize``: fastai's ``Resize(160)`` item transform (validation: the centred crop, PIL's
  bilinear resize) of one generated 400x533 JPEG, the size of clothing-small's photos;
- ``freeze``: for ``vision_learner`` models (torchvision resnet18/34/50, timm's
  tf_efficientnet_lite0, convnext_atto with LayerNorm, resnet50_gn with GroupNorm; no weights
  downloaded), every parameter's shape, whether it trains after ``freeze()`` and whether it
  gets weight decay, and the number of parameter groups;
- ``weights``: the ImageNet weights ``vision_learner(..., pretrained=True)`` asks torchvision
  for, per resnet (its ``model_meta``), and the weights enum torchvision resolves that to.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.mixup import MixUp
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropy
from fastai.torch_core import norm_bias_params
from fastai.vision.all import (
    Callback,
    DataLoaders,
    Datasets,
    create_head,
    minimum,
    slide,
    steep,
    valley,
)
from fastai.vision.augment import (
    Brightness,
    Contrast,
    Flip,
    RandomResizedCropGPU,
    Resize,
    Rotate,
    Warp,
    Zoom,
    setup_aug_tfms,
)
from fastai.vision.core import PILImage, TensorImage
from fastai.vision.learner import model_meta, vision_learner
from fasttransform import Pipeline
from torch import nn
from torchvision import models

warnings.filterwarnings("ignore")
OUT = Path(__file__).resolve().parents[1] / "tests" / "golden"


def _write(name: str, values: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {
        "generated_by": "benchmarks/fastai_golden.py",
        "fastai": metadata.version("fastai"),
        "torch": metadata.version("torch"),
        **values,
    }
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT / name}.json")


class _Record(Callback):
    """Every parameter group's lr and beta1 at each training step, as the optimizer used them."""

    order = 100

    def __init__(self):
        self.fits: list[dict[str, list]] = []  # one per fit (fine_tune makes two)

    def before_fit(self):
        self.fits.append({"lrs": [], "moms": []})

    def after_batch(self):
        if self.training:
            self.fits[-1]["lrs"].append([float(h["lr"]) for h in self.opt.hypers])
            self.fits[-1]["moms"].append(float(self.opt.hypers[-1]["mom"]))


def _learner(n_items: int, bs: int, seed: int = 0) -> Learner:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_items, 4, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(n_items, generator=g) > 0).long()
    items = list(zip(x, y, strict=True))
    dls = DataLoaders.from_dsets(items, items, bs=bs, shuffle=False, num_workers=0, device="cpu")
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    groups = lambda m: [list(m[0].parameters()), list(m[2].parameters()), list(m[4].parameters())]  # noqa: E731
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), splitter=groups, cbs=[_Record()])
    learn.create_opt()
    return learn


def one_cycle() -> dict[str, Any]:
    cases = []
    configs = [  # name, items, bs, epochs, lr, kwargs
        ("defaults", 64, 8, 3, 1e-3, {}),
        ("slice_lo_hi", 40, 8, 2, (1e-5, 1e-3), {"pct_start": 0.3, "div": 5.0}),
        ("slice_hi", 48, 16, 4, (2e-3,), {"pct_start": 0.99}),
        ("odd_steps", 70, 8, 5, 3e-2, {"div": 10.0, "div_final": 1e4, "pct_start": 0.1}),
        ("moms", 24, 8, 2, 1e-2, {"moms": (0.9, 0.8, 0.95)}),
    ]
    for name, n, bs, epochs, lr, kwargs in configs:
        learn = _learner(n, bs)
        lr_arg = slice(*lr) if isinstance(lr, tuple) else lr
        learn.fit_one_cycle(epochs, lr_arg, **kwargs)
        rec = learn.cbs.filter(lambda c: isinstance(c, _Record))[0]
        cases.append(
            {
                "name": name,
                "steps_per_epoch": len(learn.dls.train),
                "epochs": epochs,
                "lr": list(lr) if isinstance(lr, tuple) else lr,
                "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                "n_groups": 3,
                "lrs": rec.fits[-1]["lrs"],
                "moms": rec.fits[-1]["moms"],
            }
        )
    learn = _learner(40, 8)
    learn.fine_tune(2, base_lr=2e-3)  # freeze_epochs=1, lr_mult=100, pct_start=0.3, div=5
    rec = learn.cbs.filter(lambda c: isinstance(c, _Record))[0]
    steps = len(learn.dls.train)
    frozen, unfrozen = rec.fits
    fine_tune = {"steps_per_epoch": steps, "n_groups": 3, "frozen": frozen, "unfrozen": unfrozen}
    return {"cases": cases, "fine_tune": fine_tune}


def lr_find() -> dict[str, Any]:
    sweeps = []
    for seed in (0, 1, 2):
        learn = _learner(256, 8, seed)
        res = learn.lr_find(
            num_it=100, show_plot=False, suggest_funcs=(valley, slide, minimum, steep)
        )
        rec = learn.recorder
        sweeps.append(
            {
                "seed": seed,
                "num_it": 100,
                "lrs": [float(v) for v in rec.lrs],
                "losses": [float(v) for v in rec.losses],
                "valley": float(res.valley),
                "slide": float(res.slide),
                "minimum": float(res.minimum),
                "steep": float(res.steep),
            }
        )
    return {"sweeps": sweeps}


def losses() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(8, 5, generator=g) * 3
    targets = torch.randint(0, 5, (8,), generator=g)
    smoothing = {
        str(eps): float(LabelSmoothingCrossEntropy(eps=eps)(logits, targets))
        for eps in (0.0, 0.1, 0.3)
    }
    shuffle = torch.randperm(8, generator=g)
    lam = torch.rand(8, generator=g).clamp(0.5, 1.0)  # MixUp keeps max(lam, 1 - lam)
    mixed = {}
    for name, loss_func in (
        ("ce", CrossEntropyLossFlat()),
        ("ls", LabelSmoothingCrossEntropy(eps=0.1)),
    ):
        mix = MixUp(0.4)
        mix.old_lf, mix.lam, mix.yb1 = loss_func, lam, (targets[shuffle],)
        mix.learn = type("L", (), {"training": True})()  # lf reads self.training
        mixed[name] = float(mix.lf(logits, targets))
    return {
        "logits": logits.tolist(),
        "targets": targets.tolist(),
        "label_smoothing": smoothing,
        "mixup": {"shuffle": shuffle.tolist(), "lam": lam.tolist(), "loss": mixed},
    }


def tta() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    n, items, classes = 4, 6, 3
    aug = torch.softmax(torch.randn(n, items, classes, generator=g), -1)
    plain = torch.softmax(torch.randn(items, classes, generator=g), -1)
    targets = torch.randint(0, classes, (items,), generator=g)
    as_float = lambda i: float(i)  # noqa: E731, PLW0108 - fasttransform refuses the type itself
    dsets = Datasets(list(range(items)), [[as_float], [lambda i: int(targets[i])]])
    dls = dsets.dataloaders(bs=items, num_workers=0, device="cpu")
    learn = Learner(dls, nn.Linear(1, classes), loss_func=CrossEntropyLossFlat())
    out = []
    for beta, use_max in ((0.25, False), (0.0, False), (0.6, False), (0.25, True)):
        calls = iter([*(a for a in aug), plain])
        learn.get_preds = lambda *a, calls=calls, **k: (next(calls), targets)
        preds, _ = learn.tta(dl=dls.valid, n=n, beta=beta, use_max=use_max)
        out.append({"beta": beta, "use_max": use_max, "preds": preds.tolist()})
    return {"aug": aug.tolist(), "plain": plain.tolist(), "blends": out}


def interpret() -> dict[str, Any]:
    g = torch.Generator().manual_seed(11)
    items, classes = 30, 4
    probs = torch.softmax(torch.randn(items, classes, generator=g) * 2, -1)
    targets = torch.randint(0, classes, (items,), generator=g)
    names = [f"c{i}" for i in range(classes)]
    losses = nn.functional.cross_entropy(probs.log(), targets, reduction="none")

    class _Learn:  # what ClassificationInterpretation asks a learner for: the predictions
        def get_preds(self, **kwargs):
            return probs, targets, probs.argmax(1)

    dl = type("DL", (), {"vocab": [names]})()  # a list of vocabs: the last is the labels
    interp = ClassificationInterpretation(_Learn(), dl, losses)
    top_values, top_idx = interp.top_losses(k=8)
    return {
        "probs": probs.tolist(),
        "targets": targets.tolist(),
        "classes": names,
        "confusion_matrix": interp.confusion_matrix().tolist(),
        "most_confused": [[a, b, int(n)] for a, b, n in interp.most_confused(min_val=1)],
        "top_losses": {"values": top_values.tolist(), "indices": top_idx.tolist()},
    }


def head() -> dict[str, Any]:
    heads = []
    for nf in (512, 1280, 2048):
        for concat_pool in (True, False):
            h = create_head(nf, 5, lin_ftrs=[512], ps=0.5, concat_pool=concat_pool)
            layers = [
                {
                    "type": type(m).__name__,
                    "shape": [list(p.shape) for p in m.parameters(recurse=False)],
                }
                | ({"p": m.p} if isinstance(m, nn.Dropout) else {})
                for m in h.modules()
                if not list(m.children())
            ]
            heads.append(
                {
                    "nf": nf,
                    "concat_pool": concat_pool,
                    "layers": layers,
                    "n_params": sum(p.numel() for p in h.parameters()),
                }
            )
    return {"heads": heads}


def freeze() -> dict[str, Any]:
    x = torch.zeros(4, 3, 32, 32)
    items = [(x[i], i % 2) for i in range(4)]
    dls = DataLoaders.from_dsets(items, items, bs=2, num_workers=0, device="cpu")
    archs = {
        "resnet18": models.resnet18,
        "resnet34": models.resnet34,
        "resnet50": models.resnet50,
        "tf_efficientnet_lite0": "tf_efficientnet_lite0",
        "convnext_atto": "convnext_atto",
        "resnet50_gn": "resnet50_gn",
    }
    out = []
    for name, arch in archs.items():
        learn = vision_learner(
            dls, arch, n_out=5, pretrained=False, loss_func=CrossEntropyLossFlat()
        )
        learn.freeze()
        no_wd = {id(p) for p in norm_bias_params(learn.model, True)}
        out.append(
            {
                "arch": name,
                "n_groups": len(learn.opt.param_groups),
                "params": [
                    [list(p.shape), bool(p.requires_grad), id(p) not in no_wd]
                    for p in learn.model.parameters()
                ],
            }
        )
    return {"models": out}


def weights() -> dict[str, Any]:
    out = {}
    for name in ("resnet18", "resnet34", "resnet50"):
        asked = model_meta[getattr(models, name)]["weights"]  # what create_vision_model passes
        out[name] = {
            "asked": str(asked),
            "resolves_to": str(models.get_model_weights(name).verify(asked)),
        }
    return {"torchvision": out}


def affine() -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    n = 8
    flip = (torch.rand(n, generator=g) < 0.5).float()
    deg = (torch.rand(n, generator=g) * 20 - 10) * (torch.rand(n, generator=g) < 0.75)
    scale = 1 + 0.1 * torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.75)
    col, row = torch.rand(n, generator=g), torch.rand(n, generator=g)
    tfm = setup_aug_tfms(
        [
            Flip(p=1.0, draw=flip),
            Rotate(max_deg=10, p=1.0, draw=deg),
            Zoom(min_zoom=1.0, max_zoom=1.1, p=1.0, draw=scale, draw_x=col, draw_y=row),
        ]
    )[0]
    tfm.before_call(TensorImage(torch.rand(n, 3, 8, 8, generator=g)), split_idx=0)
    return {
        "flip": flip.tolist(),
        "deg": deg.tolist(),
        "scale": scale.tolist(),
        "col": col.tolist(),
        "row": row.tolist(),
        "matrices": torch.as_tensor(tfm.mat).tolist(),
    }


def _packed(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as its shape, dtype and base64 little-endian bytes (pixels are many numbers)."""
    a = t.detach().contiguous().numpy()
    return {
        "shape": list(a.shape),
        "dtype": a.dtype.str,
        "base64": base64.b64encode(a.tobytes()).decode(),
    }


def _pixel_case(s: int, size: int, seed: int) -> dict[str, Any]:
    """One fastai batch: smooth images with sharp edges, fixed draws, a seeded crop."""
    g = torch.Generator().manual_seed(seed)
    n = 4
    smooth = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(s, s), mode="bicubic")
    images = smooth.clamp(0, 1) * 200
    images[:, :, s // 4 : s // 2, s // 3 : 2 * s // 3] += 55  # an edge to resample
    images = images.round().to(torch.uint8)

    def keep() -> torch.Tensor:  # fastai's p_affine / p_lighting masks, drawn here
        return (torch.rand(n, generator=g) < 0.75).float()

    flip = (torch.rand(n, generator=g) < 0.5).float()
    deg = (torch.rand(n, generator=g) * 20 - 10) * keep()
    scale = 1 + 0.1 * torch.rand(n, generator=g) * keep()
    col, row = torch.rand(n, generator=g), torch.rand(n, generator=g)
    warp_x = (torch.rand(n, generator=g) * 0.4 - 0.2) * keep()
    warp_y = (torch.rand(n, generator=g) * 0.4 - 0.2) * keep()
    bright = 0.5 + (torch.rand(n, generator=g) * 0.2 - 0.1) * keep()
    contrast = torch.exp((torch.rand(n, generator=g) * 2 - 1) * -math.log(0.8) * keep())
    crop = RandomResizedCropGPU(size, min_scale=0.75, ratio=(1, 1))
    tfms = setup_aug_tfms(
        [
            Flip(p=1.0, draw=flip.tolist()),
            Warp(magnitude=0.2, p=1.0, draw_x=warp_x.tolist(), draw_y=warp_y.tolist()),
            Rotate(max_deg=10, p=1.0, draw=deg.tolist()),
            Zoom(min_zoom=1.0, max_zoom=1.1, p=1.0, draw=scale.tolist(), draw_x=col.tolist(),
                 draw_y=row.tolist()),
            Brightness(max_lighting=0.2, p=1.0, draw=bright.tolist()),
            Contrast(max_lighting=0.2, p=1.0, draw=contrast.tolist()),
            crop,
        ]
    )  # fmt: skip
    x = TensorImage(images.float() / 255)  # IntToFloatTensor
    random.seed(seed)
    train = Pipeline(tfms, split_idx=0)(x)
    top, left = crop.tl
    side, side_w = crop.cp_size
    valid = Pipeline(tfms, split_idx=1)(x)
    return {
        "size": size,
        "images": _packed(images),
        "flip": flip.tolist(),
        "deg": deg.tolist(),
        "scale": scale.tolist(),
        "col": col.tolist(),
        "row": row.tolist(),
        "warp_x": warp_x.tolist(),
        "warp_y": warp_y.tolist(),
        "bright": bright.tolist(),
        "contrast": contrast.tolist(),
        "crop": [int(top), int(left), int(side), int(side_w)],
        "order": [type(t).__name__ for t in Pipeline(tfms).fs],
        "train": _packed(torch.as_tensor(train)),
        "valid": _packed(torch.as_tensor(valid)),
    }


def pixels() -> dict[str, Any]:
    return {"cases": [_pixel_case(20, 16, 3), _pixel_case(42, 20, 1)]}


def presize() -> dict[str, Any]:
    from PIL import Image

    g = torch.Generator().manual_seed(7)
    w, h = 400, 533
    smooth = F.interpolate(torch.rand(1, 3, 9, 7, generator=g), size=(h, w), mode="bicubic")
    pixels = smooth.clamp(0, 1)[0] * 200 + torch.rand(3, h, w, generator=g) * 6  # some grain
    pixels[:, 200:330, 120:280] += 45  # edges
    array = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    resized = Resize(160)(PILImage.create(data), split_idx=1)  # validation: centred
    return {
        "jpeg_base64": base64.b64encode(data).decode(),
        "size": 160,
        "resized": _packed(torch.from_numpy(np.asarray(resized).copy())),
    }


def main() -> None:
    torch.set_num_threads(1)
    for name, build in (
        ("one_cycle", one_cycle),
        ("lr_find", lr_find),
        ("losses", losses),
        ("tta", tta),
        ("interpret", interpret),
        ("head", head),
        ("freeze", freeze),
        ("affine", affine),
        ("pixels", pixels),
        ("presize", presize),
        ("weights", weights),
    ):
        _write(name, build())


if __name__ == "__main__":
    main()
