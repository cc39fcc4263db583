"""fastai's Learner on the lock-step set in float64: the reference tests/test_lockstep.py checks
ours against (ours' side and the set: tests/lockstep.py).

    make bench-env && .venv-bench/bin/python benchmarks/fastai_lockstep.py

fastai 2.8.12 trains a copy of ours' starting model (resnet18 with fastai's head, dropout off,
``.double()``) through ``freeze`` + ``fit_one_cycle``, ``unfreeze`` + ``fit_one_cycle`` with
``slice(lo, hi)`` and ``MixUp`` + ``fit_one_cycle``, label smoothing throughout
(``LabelSmoothingCrossEntropy``, which computes in the logits' dtype; ``CrossEntropyLossFlat``
would compute in float32). Its inputs are the tensors ours' batch pipeline makes (float32,
normalized; cast to float64 after MixUp blends them, as Fabric's 64-true casts ours'), batched in
ours' sampler order (``shuffle_fn``), with ours' MixUp draws (a ``MixUp`` subclass replaying
ours' generator). Written: per stage fastai's per-epoch train loss (smoothed), valid loss and
accuracy, its per-step smoothed losses, and a summary of every weight tensor after the stage.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from copy import deepcopy
from importlib import metadata
from pathlib import Path

import torch
from fastai.callback.mixup import MixUp
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import LabelSmoothingCrossEntropy
from fastai.metrics import accuracy
from fastai.torch_core import unsqueeze
from fastai.vision.all import Callback
from fastai.vision.learner import model_meta
from fastcore.foundation import L
from torchvision import models

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import lockstep  # noqa: E402

from cassava_pipeline.vision.data import EpochSampler  # noqa: E402
from cassava_pipeline.vision.provenance import stage_seed  # noqa: E402
from cassava_pipeline.vision.run import model_from_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")
OUT = ROOT / "tests" / "golden" / "lockstep.json"


class ToDouble(Callback):
    """The batch in float64 once MixUp has blended it in float32 (Fabric's 64-true on ours)."""

    order = MixUp.order + 1

    def before_batch(self):
        self.learn.xb = tuple(x.double() for x in self.xb)


class DoubleSmoothLoss(Callback):
    """The recorder's running train loss in float64 (it starts from a float32 zero each fit);
    ours keeps it in float64 too."""

    order = 51  # after the Recorder's reset

    def before_fit(self):
        self.learn.recorder.smooth_loss.val = torch.zeros((), dtype=torch.float64)


class OursMixUp(MixUp):
    """fastai's MixUp with ours' draws: per batch a seed from ours' generator, then lambda from
    Beta(alpha, alpha) and the shuffle under it (``vision.learner.mixup_batch``)."""

    def __init__(self, alpha: float, seed: int):
        super().__init__(alpha)
        self.alpha, self.g = alpha, torch.Generator().manual_seed(seed)

    def before_batch(self):
        n = self.y.size(0)
        # ours draws inside Fabric's 64-true context, where tensors default to float64: the
        # Beta distribution is float64 there, and lambda is rounded to the batch's float32
        alpha = torch.tensor(self.alpha, dtype=torch.float64)
        beta = torch.distributions.Beta(alpha, alpha)
        with torch.random.fork_rng(devices=[]):
            torch.random.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.g)))
            lam = beta.sample((n,))
            shuffle = torch.randperm(n)
        self.lam = torch.maximum(lam, 1 - lam).float()
        xb1, self.yb1 = tuple(L(self.xb).itemgot(shuffle)), tuple(L(self.yb).itemgot(shuffle))
        weight = unsqueeze(self.lam, n=len(self.x.size()) - 1)
        self.learn.xb = tuple(L(xb1, self.xb).map_zip(torch.lerp, weight=weight))

    def lf(self, pred, *yb):  # lambda in the losses' dtype (float64), as ours' mixup_loss
        if not self.training:
            return self.old_lf(pred, *yb)
        old = self.old_lf.reduction
        self.old_lf.reduction = "none"
        try:
            loss = torch.lerp(
                self.old_lf(pred, *self.yb1), self.old_lf(pred, *yb), self.lam.double()
            )
        finally:
            self.old_lf.reduction = old
        return loss.mean()


class Orders:
    """fastai's shuffle_fn, handing out ours' sampler order, epoch after epoch of one stage."""

    def __init__(self, n: int, stage: str, seed: int):
        self.sampler = EpochSampler(n, shuffle=True, seed=stage_seed(seed, stage))
        self.epoch = 0

    def __call__(self, idxs):
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return list(self.sampler.indices())


class Steps(Callback):
    order = 90

    def __init__(self):
        self.losses: list[float] = []

    def after_batch(self):
        if self.training:
            self.losses.append(float(self.learn.smooth_loss))


def main() -> None:
    lockstep.write_images()
    with tempfile.TemporaryDirectory() as tmp:
        full = lockstep.shards(Path(tmp))
        train, valid = full.split()
        start = lockstep.initial_checkpoint()
        xs_train = lockstep.normalized(train, start)
        xs_valid = lockstep.normalized(valid, start)
        ys_train = [int(train[i][1]) for i in range(len(train))]
        ys_valid = [int(valid[i][1]) for i in range(len(valid))]
    model, _ = model_from_checkpoint(deepcopy(start))  # float64: the checkpoint's dtype
    items = list(zip(xs_train, ys_train, strict=True))
    dls = DataLoaders.from_dsets(
        items, list(zip(xs_valid, ys_valid, strict=True)), bs=lockstep.BATCH, num_workers=0,
        device="cpu",
    )  # fmt: skip
    assert dls.train.drop_last and dls.train.shuffle
    steps = Steps()
    learn = Learner(
        dls,
        model,
        loss_func=LabelSmoothingCrossEntropy(eps=0.1),
        metrics=accuracy,
        splitter=model_meta[models.resnet18]["split"],
        cbs=[ToDouble(), DoubleSmoothLoss(), steps],
    )
    record = {"stages": []}
    for cfg in lockstep.STAGES:
        dls.train.shuffle_fn = Orders(len(items), cfg.name, cfg.seed)
        if cfg.name == "frozen":
            learn.freeze()
        elif cfg.name == "unfrozen":
            learn.unfreeze()
        if cfg.mixup:
            learn.add_cb(OursMixUp(cfg.mixup, stage_seed(cfg.seed, cfg.name) + 104729 * 0))
        lr = cfg.lr if isinstance(cfg.lr, float) else slice(*cfg.lr)
        steps.losses = []
        with learn.no_bar():
            learn.fit_one_cycle(cfg.epochs, lr)
        values = learn.recorder.values  # this fit's epochs (the recorder restarts per fit)
        record["stages"].append(
            {
                "name": cfg.name,
                "epochs": [
                    {"train_loss": float(v[0]), "valid_loss": float(v[1]), "accuracy": float(v[2])}
                    for v in values
                ],
                "step_losses": steps.losses,
                "weights": lockstep.weight_summary(learn.model.state_dict()),
            }
        )
        print(cfg.name, record["stages"][-1]["epochs"])
    doc = {
        "generated_by": "benchmarks/fastai_lockstep.py",
        "fastai": metadata.version("fastai"),
        "torch": metadata.version("torch"),
        **record,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
