"""One parameterised training loop: fastai's ``fit_one_cycle`` with its optimizer and callbacks.

- AdamW as fastai sets it up: betas (0.9, 0.99) with beta1 cycled by the schedule, eps 1e-5,
  decoupled weight decay 0.01, none on BatchNorm parameters and biases;
- the one-cycle schedule of :mod:`.schedule`; discriminative learning rates over the model's
  parameter groups (``slice(low, high)``);
- optional mixup (fastai's ``MixUp``: per-sample lambda from Beta(alpha, alpha), lambda =
  max(lambda, 1 - lambda), training only) and label smoothing;
- the device, precision (bf16, fp16 with a GradScaler) and data parallelism (DDP) come from
  Lightning Fabric; channels-last, ``torch.compile`` and gradient accumulation are options;
- a checkpoint after every epoch, written atomically, holding everything a resumed run needs to
  end bit for bit where an uninterrupted run ends (on CPU), and the fingerprint of what it was
  computed from (:mod:`.provenance`): it is resumed or reused only when all of that is equal;
- each stage draws its own random streams (order, crops, augmentation, mixup, dropout) from the
  seed and the stage's name;
- the best epoch by the monitored metric is what the stage returns (``SaveModelCallback``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning_utilities import apply_to_collection
from timm.utils import unwrap_model
from torch import nn
from tqdm.auto import tqdm

from .allocator import Mode
from .augment import AugmentOptions, BatchAugment
from .data import CroppedItems, EpochSampler, LoaderOptions, make_loader
from .integrity import display_path
from .kept import KeepPolicy
from .models import Stats, freeze, no_decay_params, param_groups, unfreeze
from .options import (
    STRICT,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    OpenFraction,
    OptionError,
    PositiveFloat,
    PositiveInt,
    Side,
    check_choices,
)
from .provenance import explain, fingerprint, stage_seed
from .resume import ResumeFiles, load_sweep, restore, save_sweep, snapshot
from .schedule import (
    ExponentialScheduler,
    LrFindOptions,
    OneCycle,
    OneCycleScheduler,
    SmoothLoss,
    discriminative_lrs,
    suggest_valley,
)
from .shards import ShardedImages

logger = logging.getLogger(__name__)

# Columns of a stage's per-epoch history, in order.
HISTORY_COLUMNS = (
    "stage",
    "epoch",
    "train_loss",
    "valid_loss",
    "accuracy",
    "error_rate",
    "lr",
    "seconds",
)


POSTFIX_SECONDS = 0.5  # the progress bar's loss is read (a device sync) at most this often

# StageConfig fields lr_find's sweep does not read: changing them keeps its cached result.
SWEEP_UNUSED = (
    "epochs",
    "one_cycle",
    "monitor",
    "mixup",
    "grad_accum",
    "compile",
    "validate_before",
    "optimizer_state",
)


@dataclass(frozen=True)
class StageConfig:
    """One ``fit_one_cycle`` call of the recipe (frozen, unfrozen or mixup)."""

    __pydantic_config__ = STRICT

    name: str
    epochs: NonNegativeInt  # 0: no training (the pipeline passes the checkpoint on)
    # one rate; [low, high] spread over the groups; [high] = slice(high); auto: lr_find's
    # suggestion, resolved before fit
    lr: Any
    freeze: bool = True  # train the head (and BatchNorm) only
    size: Side = 224  # output side of the batch augmentation (aug_transforms(size=...))
    augment: AugmentOptions = field(default_factory=AugmentOptions)  # its size is ``size``
    one_cycle: OneCycle = field(default_factory=OneCycle)
    loader: LoaderOptions = field(default_factory=LoaderOptions)
    wd: NonNegativeFloat = 0.01  # fastai's default weight decay, decoupled (AdamW)
    betas: tuple[Fraction, Fraction] = (0.9, 0.99)  # fastai's Adam betas (beta1 is then cycled)
    eps: PositiveFloat = 1e-5  # fastai's Adam eps
    mixup: NonNegativeFloat = 0.0  # MixUp alpha; 0 = off
    label_smoothing: OpenFraction = 0.0  # 0 = plain cross-entropy
    # SaveModelCallback's metric: the epoch with the best accuracy (max) or valid_loss (min)
    # is kept; last: the last epoch, as fastai's fit_one_cycle and fine_tune without the callback
    monitor: Literal["accuracy", "valid_loss", "last"] = "accuracy"
    grad_accum: PositiveInt = 1  # batches per optimizer step
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    seed: int = 42
    validate_before: bool = False  # one validation pass before the first epoch (fastai: none)
    # AdamW's state at the start: "fastai" carries the previous stage's (its moving averages and
    # step count) when the same parameters train, as fastai's Learner keeps one optimizer and
    # clears its state only on freeze/unfreeze; "reset": a fresh optimizer every stage.
    optimizer_state: Literal["fastai", "reset"] = "fastai"

    def __post_init__(self) -> None:
        check_choices(self, self.name)
        object.__setattr__(self, "lr", _rate(self.lr))
        if self.augment.size is not None:
            reason = "the output side is the stage's size; give it there, not in augment"
            raise OptionError("augment", self.augment, reason, self.name)

    def trained_at(self, checkpoint: dict[str, Any]) -> StageConfig:
        """These settings at the image size ``checkpoint`` was trained at: an earlier stage's
        when the later ones were switched off (``epochs: 0``)."""
        return replace(self, size=int(checkpoint.get("image_size", self.size)))

    @property
    def augmentation(self) -> AugmentOptions:
        """``aug_transforms(size=self.size, **augment)``: the stage's batch augmentation."""
        return replace(self.augment, size=self.size)


LR_ALLOWED = "auto, a rate > 0, [high] or [low, high] (fastai's slice)"


def _rate(value: Any) -> float | list[float] | tuple[float, ...] | str:
    """``auto``, one rate, or fastai's slice as ``[high]`` or ``[low, high]``, as numbers."""
    if value == "auto":
        return value
    rates = value if isinstance(value, list | tuple) else [value]
    if not 1 <= len(rates) <= 2 or not all(_positive_number(r) for r in rates):
        raise OptionError("lr", value, f"must be {LR_ALLOWED}")
    if not isinstance(value, list | tuple):
        return float(value)
    if len(rates) == 2 and float(rates[0]) > float(rates[1]):
        raise OptionError("lr", value, f"[low, high] needs low <= high ({LR_ALLOWED})")
    return type(value)(float(r) for r in rates)


def _positive_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


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


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how to run: Lightning Fabric's accelerator, devices, strategy and precision."""

    __pydantic_config__ = STRICT

    accelerator: Accelerator = "auto"  # cpu, cuda or auto
    devices: PositiveInt = 1  # > 1: data-parallel (DDP) from inside the node
    precision: Precision = "32-true"  # 32-true, bf16-mixed or 16-mixed
    num_nodes: PositiveInt = 1  # several machines: launch with torchrun (see README)
    strategy: str = "auto"  # auto: ddp when devices * num_nodes > 1
    progress: bool = True  # a batch progress bar
    # glibc malloc settings for CPU tensors (vision/allocator.py)
    malloc: Mode = "tuned"
    # earlier runs of each stage kept for reuse when their settings come back (vision/kept.py)
    keep: KeepPolicy = field(default_factory=KeepPolicy)

    def __post_init__(self) -> None:
        check_choices(self, "runtime")
        if self.accelerator == "cpu" and self.precision in ("16-mixed", "16-true"):
            reason = f"precision {self.precision} needs CUDA; on a CPU use 32-true or bf16-mixed"
            raise OptionError("precision", self.precision, reason, "runtime")


@dataclass
class StageResult:
    """What a stage hands on: the best weights and the per-epoch history."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    best_epoch: int
    best_metric: float
    start_metrics: dict[str, float] = field(default_factory=dict)  # before the first epoch
    trained_on: dict[str, str] = field(default_factory=dict)  # the shards' content digests
    # AdamW's state after the last epoch (on the CPU), for a next stage that carries it
    optimizer_state: dict[str, Any] | None = None


def make_optimizer(model: nn.Module, lrs: list[float], cfg: StageConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups; no weight decay on BatchNorm and biases."""
    no_wd = no_decay_params(model)
    groups = []
    for params, lr in zip(param_groups(model), lrs, strict=True):
        decay = [p for p in params if id(p) not in no_wd]
        other = [p for p in params if id(p) in no_wd]
        groups.append({"params": decay, "lr": lr, "weight_decay": cfg.wd})
        groups.append({"params": other, "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lrs[-1], betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.wd)


def carried_state(
    carried: dict[str, Any] | None, cfg: StageConfig, opt: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """The previous stage's optimizer state if this stage starts from it, else None.

    Carried with ``optimizer_state: fastai`` when the previous stage trained the same parameters
    (its ``freeze`` equals this one's: fastai clears the state on freeze/unfreeze) and the state
    fits this optimizer (the same groups and shapes); a state that does not fit is reported and
    left.
    """
    if cfg.optimizer_state != "fastai" or not carried or carried.get("state") is None:
        return None
    if bool(carried.get("freeze")) != cfg.freeze:
        return None
    state = carried["state"]
    params = [p for g in opt.param_groups for p in g["params"]]
    sizes = [len(g["params"]) for g in opt.param_groups]
    fits = sizes == [len(g["params"]) for g in state.get("param_groups", [])] and all(
        0 <= int(i) < len(params)
        and all(
            t.shape == params[int(i)].shape
            for k, t in s.items()
            if k != "step" and isinstance(t, torch.Tensor)
        )
        for i, s in state.get("state", {}).items()
    )
    if not fits:
        logger.warning(
            "%s: the previous stage's optimizer state does not fit this model's parameter "
            "groups; AdamW starts fresh",
            cfg.name,
        )
        return None
    return state


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a carried AdamW state (moving averages, step counts) and keep this stage's own
    hyperparameters (learning rates, weight decay, betas)."""
    current = opt.state_dict()
    # Copies: torch's load_state_dict keeps a CPU tensor as it is, and under ddp_spawn the
    # checkpoint's tensors reach every process in one shared memory block, so each process's
    # in-place AdamW updates would land in the others' state too.
    own = cpu_copy(state["state"])
    opt.load_state_dict({"state": own, "param_groups": current["param_groups"]})


def optimizer_digest(state: dict[str, Any]) -> str:
    """A hash of an optimizer state's tensors (by parameter index and name) and group sizes."""
    flat = {
        f"{i}.{k}": v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        for i in sorted(state["state"], key=int)
        for k, v in sorted(state["state"][i].items())
    }
    sizes = [len(g["params"]) for g in state["param_groups"]]
    return weights_digest(flat) + ":" + ",".join(map(str, sizes))


def cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor cloned onto the CPU."""
    return apply_to_collection(obj, torch.Tensor, lambda t: t.detach().cpu().clone())


def mixup_batch(
    x: torch.Tensor, y: torch.Tensor, alpha: float, g: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastai's MixUp: (mixed x, shuffled y, lambda per sample), lambda >= 0.5."""
    n = y.shape[0]
    beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
    with torch.random.fork_rng(devices=[]):
        if g is not None:
            torch.random.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        lam = beta.sample((n,))
        shuffle = torch.randperm(n)
    lam = torch.maximum(lam, 1 - lam).to(x.device, x.dtype)
    shuffle = shuffle.to(x.device)
    mixed = torch.lerp(x[shuffle], x, lam.view(-1, 1, 1, 1))
    return mixed, y[shuffle], lam


def _loss(logits, y, smoothing: float, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy, with fastai's ``LabelSmoothingCrossEntropy(eps=smoothing)`` when > 0: in
    float32 from half-precision logits, in float64 from float64 ones (precision 64-true)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, y, label_smoothing=smoothing, reduction=reduction)


def mixup_loss(
    logits: torch.Tensor, y: torch.Tensor, y_shuffled: torch.Tensor, lam: torch.Tensor, smoothing
) -> torch.Tensor:
    """fastai's ``MixUp.lf``: per item, the loss on the shuffled labels lerped towards the loss
    on the item's own labels by ``lam``; then the mean."""
    own = _loss(logits, y, smoothing, "none")
    return torch.lerp(_loss(logits, y_shuffled, smoothing, "none"), own, lam.to(own.dtype)).mean()


@dataclass
class BestEpoch:
    """fastai's ``SaveModelCallback``: the weights of the epoch with the best ``monitor`` (the
    highest accuracy, the lowest valid_loss); ``last``: fit_one_cycle without the callback,
    the last epoch's weights (no copies)."""

    monitor: str
    weights: dict[str, torch.Tensor] | None = None
    metric: float | None = None
    epoch: int = -1

    def update(self, row: dict[str, Any], model: nn.Module) -> None:
        """After an epoch: a copy of ``model``'s weights when ``row`` is the best so far."""
        if self.monitor == "last":
            self.metric, self.epoch = row["accuracy"], row["epoch"]
            return
        value = row[self.monitor]
        if self.metric is None:
            better = True
        else:
            better = value < self.metric if self.monitor == "valid_loss" else value > self.metric
        if better and not math.isnan(value):
            self.metric, self.epoch = value, row["epoch"]
            self.weights = cpu_copy(model.state_dict())

    def load_into(self, model: nn.Module, epochs_done: int) -> dict[str, torch.Tensor]:
        """Put the kept weights into ``model`` and return them; the last epoch's where none was
        kept (monitor last, or no finite metric: an empty validation set)."""
        if self.weights is None:
            self.weights, self.epoch = cpu_copy(model.state_dict()), epochs_done - 1
        model.load_state_dict(self.weights)
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.weights, "best_metric": self.metric, "best_epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.metric, self.epoch = (
            state["best"],
            state["best_metric"],
            state["best_epoch"],
        )


@dataclass
class _Step:
    """What one training batch uses, set up once per fit or lr_find (:meth:`Trainer._setup`)."""

    model: nn.Module  # Fabric's wrapper
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or its torch.compile
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    augment: BatchAugment
    gens: tuple[torch.Generator, torch.Generator]  # augmentation (on the device), mixup (CPU)
    cfg: StageConfig
    mixup: float  # MixUp alpha; 0 = off
    grad_accum: int  # batches per optimizer step


class Trainer:
    """Runs stages and lr_find for one model on one Fabric (one process of a DDP group)."""

    def __init__(
        self,
        fabric,
        model: nn.Sequential,
        stats: Stats,
        *,
        progress: bool = True,
        keep: KeepPolicy | None = None,
    ):
        self.fabric = fabric
        self.model = model
        self.stats = stats
        self.progress = progress and fabric.is_global_zero
        self.keep = keep if keep is not None else KeepPolicy()

    # ---- data ----------------------------------------------------------------------------
    def loaders(self, train: ShardedImages, valid: ShardedImages, cfg: StageConfig):
        """(training, validation) loaders; the training order and crops follow the stage's seed."""
        f = self.fabric
        cuda = f.device.type == "cuda"
        seed = stage_seed(cfg.seed, cfg.name)
        tr_sampler = EpochSampler(
            len(train), shuffle=True, seed=seed, rank=f.global_rank, world_size=f.world_size
        )
        va_sampler = EpochSampler(
            len(valid),
            shuffle=False,
            seed=seed,
            rank=f.global_rank,
            world_size=f.world_size,
            pad=False,
        )
        tr = make_loader(
            CroppedItems(train, train=True, seed=seed),
            tr_sampler,
            cfg.loader,
            drop_last=len(train) >= cfg.loader.batch_size * f.world_size,
            cuda=cuda,
        )
        va = make_loader(
            CroppedItems(valid, train=False, seed=seed),
            va_sampler,
            cfg.loader,
            drop_last=False,
            cuda=cuda,
        )
        return tr, va

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, loader, augment: BatchAugment, cfg: StageConfig) -> dict[str, float]:
        """Loss, accuracy and error rate over the whole validation set (summed over ranks)."""
        f = self.fabric
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=f.device)  # loss, correct, count
        for batch_x, batch_y in loader:
            images = batch_x.to(f.device, non_blocking=True)
            labels = batch_y.to(f.device, non_blocking=True)  # a blocking copy waits for the GPU
            x = _model_input(augment, images, cfg, train=False)
            # the unwrapped module: the input in its precision as Fabric's wrapper would cast it
            # (float64 at 64-true, bf16 at bf16-true; unchanged for the mixed precisions)
            x = f.strategy.precision.convert_input(x)
            with f.autocast():
                logits = self.model(x)
            loss = _loss(logits, labels, cfg.label_smoothing, reduction="sum")
            sums += torch.stack(
                [
                    loss.double(),
                    (logits.argmax(1) == labels).sum().double(),
                    torch.tensor(labels.shape[0], dtype=torch.float64, device=f.device),
                ]
            )
        if f.world_size > 1:
            sums = f.all_reduce(sums, reduce_op="sum")
        loss, correct, count = (float(v) for v in sums.cpu())
        if count == 0:
            return {"valid_loss": math.nan, "accuracy": math.nan, "error_rate": math.nan}
        return {
            "valid_loss": loss / count,
            "accuracy": correct / count,
            "error_rate": 1 - correct / count,
        }

    # ---- training ------------------------------------------------------------------------
    def fit(
        self,
        train: ShardedImages,
        valid: ShardedImages,
        cfg: StageConfig,
        *,
        checkpoint_dir: Path | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        carried_optimizer: dict[str, Any] | None = None,
    ) -> StageResult:
        """``fit_one_cycle(cfg.epochs, cfg.lr)`` with the stage's freezing, mixup and options.

        Resumes from ``checkpoint_dir/last.pt`` when its fingerprint equals this run's (the
        settings, learning rate, shards' content, starting weights, precision, device type,
        world size, code and package versions): an unfinished one goes on from its last epoch,
        a finished one is returned as it is (same inputs: the same result). Otherwise one log
        line says which input differs, and the stage trains from the start. ``on_epoch`` is
        called with each epoch's history row, after its resume file is written.

        ``carried_optimizer`` (``{"freeze": bool, "state": AdamW state_dict}``): the previous
        stage's optimizer state after its last epoch. With ``cfg.optimizer_state: fastai`` it is
        the starting state when that stage trained the same parameters (same ``freeze``), as
        fastai's Learner keeps its optimizer across ``fit_one_cycle`` calls and clears it only on
        freeze/unfreeze; otherwise AdamW starts fresh.
        """
        if cfg.lr == "auto":
            raise ValueError(f"{cfg.name}: lr auto is lr_find's suggestion; resolve it before fit")
        f = self.fabric
        opt = self._optimizer(cfg, cfg.lr)
        carried = carried_state(carried_optimizer, cfg, opt)
        fp = self.fingerprint(
            train, cfg, cfg.lr, optimizer=optimizer_digest(carried) if carried else "fresh"
        )
        tr_loader, va_loader = self.loaders(train, valid, cfg)
        steps_per_epoch = max(1, len(tr_loader) // cfg.grad_accum)
        step = self._setup(
            cfg,
            opt,
            lambda o: OneCycleScheduler(o, cfg.epochs * steps_per_epoch, cfg.one_cycle),
            carried=carried,
            mixup=cfg.mixup,
            grad_accum=cfg.grad_accum,
            compile=cfg.compile,
        )
        files = ResumeFiles(checkpoint_dir, cfg.name, self.keep) if checkpoint_dir else None
        best = BestEpoch(cfg.monitor)
        state = self._resume(files, fp, step, best)
        smooth = SmoothLoss()  # fastai's running train loss carries across epochs
        smooth.avg, smooth.count = float(state["smooth"][0]), int(state["smooth"][1])
        if state["epoch"] == 0 and cfg.validate_before:
            state["start_metrics"] = self._validate_before(step, va_loader)
        if state["epoch"] == 0 and f.is_global_zero:
            logger.info("%s: %s", cfg.name, _header())
        for epoch in range(state["epoch"], cfg.epochs):
            t0 = time.perf_counter()
            self._train_epoch(step, tr_loader, epoch, steps_per_epoch * cfg.grad_accum, smooth)
            _sync_buffers(f, unwrap_model(step.model))
            row = {
                "stage": cfg.name,
                "epoch": epoch,
                "train_loss": smooth.value,
                **self.validate(va_loader, step.augment, cfg),
                "lr": float(step.opt.param_groups[-1]["lr"]),
                "seconds": time.perf_counter() - t0,
            }
            state["history"].append(row)
            best.update(row, unwrap_model(step.model))
            state["epoch"], state["smooth"] = epoch + 1, [float(smooth.avg), smooth.count]
            if f.is_global_zero:
                logger.info("%s: %s", cfg.name, _row(row))
                if files is not None:
                    loop = {**state, **best.state_dict()}
                    raw = unwrap_model(step.model)
                    files.save(snapshot(loop, fp, raw, step.opt, step.sched, step.gens))
                if on_epoch is not None:
                    on_epoch(row)
            f.barrier()
        weights = best.load_into(unwrap_model(step.model), state["epoch"])
        if best.epoch >= 0 and f.is_global_zero:
            logger.info(
                "%s: kept epoch %d of %d (monitor: %s), %s %.6f",
                cfg.name,
                best.epoch,
                cfg.epochs,
                cfg.monitor,
                "accuracy" if cfg.monitor == "last" else cfg.monitor,
                best.metric if best.metric is not None else math.nan,
            )
        return StageResult(
            weights,
            state["history"],
            best.epoch,
            best.metric if best.metric is not None else math.nan,
            state["start_metrics"],
            train.content,
            # after the last epoch, as fastai's (SaveModelCallback reloads weights, not state)
            cpu_copy(step.opt.state_dict()),
        )

    def _optimizer(self, cfg: StageConfig, lr) -> torch.optim.AdamW:
        """Freeze or unfreeze for the stage and make its AdamW at the stage's rates."""
        (freeze if cfg.freeze else unfreeze)(self.model)
        lrs = discriminative_lrs(lr, len(param_groups(self.model)))
        if cfg.channels_last:  # before DDP wraps it: gradient buckets follow the layout
            self.model.to(memory_format=torch.channels_last)
        return make_optimizer(self.model, lrs, cfg)

    def _setup(self, cfg, opt, schedule, *, carried, mixup, grad_accum, compile) -> _Step:
        """Seed the stage's random streams, hand the model and ``opt`` to Fabric, load a
        ``carried`` AdamW state and make the schedule, augmentation and generators."""
        f = self.fabric
        seed = stage_seed(cfg.seed, cfg.name)
        torch.manual_seed(seed)
        model, opt = f.setup(self.model, opt)
        if carried is not None:  # after setup: the state goes to the parameters' device
            load_optimizer_state(opt, carried)
            if f.is_global_zero:
                logger.info("%s: AdamW goes on from the previous stage's state", cfg.name)
        return _Step(
            model=model,
            forward=torch.compile(model) if compile else model,
            opt=opt,
            sched=schedule(opt),
            augment=BatchAugment(cfg.augmentation, self.stats.mean, self.stats.std),
            gens=(
                torch.Generator(device=f.device).manual_seed(seed + 7919 * f.global_rank),
                torch.Generator().manual_seed(seed + 104729 * f.global_rank),
            ),
            cfg=cfg,
            mixup=mixup,
            grad_accum=grad_accum,
        )

    def _resume(
        self, files: ResumeFiles | None, fp: dict[str, Any], step: _Step, best: BestEpoch
    ) -> dict:
        """The loop's state: a resume file's from the same inputs (restored into ``step`` and
        ``best``), or a fresh one."""
        f, name = self.fabric, step.cfg.name
        state = {"epoch": 0, "history": [], "smooth": [0.0, 0], "start_metrics": {}}
        found = files.find(f, fp) if files is not None else None
        if found is None:
            return state
        path, saved = found
        reason = explain(saved.get("fingerprint"), fp)
        if reason is None:
            restore(saved, unwrap_model(step.model), step.opt, step.sched, step.gens)
            best.load_state_dict(saved)
            state = {k: saved[k] for k in state}
            done = "finished; reusing it" if state["epoch"] >= step.cfg.epochs else "resuming"
            logger.info(
                "%s: %s holds this run after epoch %d: %s",
                name,
                display_path(path),
                state["epoch"],
                done,
            )
        elif f.is_global_zero:  # kept for when its settings return
            where = files.set_aside(path, saved)
            kept = f" (that run is kept as {display_path(where)})" if where else ""
            logger.info(
                "%s: %s %s; training from the start%s", name, display_path(path), reason, kept
            )
        return state

    def _validate_before(self, step: _Step, loader) -> dict[str, float]:
        """Where the stage starts from (e.g. the untrained head's accuracy): a full validation
        pass, which fastai does not make, so it is off by default."""
        _sync_buffers(self.fabric, unwrap_model(step.model))
        start = self.validate(loader, step.augment, step.cfg)
        if self.fabric.is_global_zero:
            logger.info(
                "%s: before training: valid_loss %.6f, accuracy %.6f",
                step.cfg.name,
                start["valid_loss"],
                start["accuracy"],
            )
        return start

    def _train_epoch(self, step: _Step, loader, epoch: int, n_batches: int, smooth) -> None:
        """One epoch of training batches (``n_batches``: whole accumulations only)."""
        step.model.train()
        loader.sampler.set_epoch(epoch)
        step.opt.zero_grad(set_to_none=True)
        batches = _progress(loader, self.progress, f"{step.cfg.name} {epoch}")
        shown = -math.inf  # when the progress bar last showed the loss
        for i, batch in enumerate(batches):
            if i >= n_batches:
                break
            loss = self._train_batch(step, batch, last=(i + 1) % step.grad_accum == 0)
            # On the device: reading the loss each step would make the CPU wait for the GPU
            # before it queues the next batch (about 30% of a step on an H200, gpu_check)
            smooth.update(loss.double())
            if self.progress and hasattr(batches, "set_postfix"):
                now = time.monotonic()
                if now - shown >= POSTFIX_SECONDS or i + 1 == n_batches:  # read rarely
                    batches.set_postfix(loss=f"{smooth.value:.4f}")
                    shown = now

    def _train_batch(self, step: _Step, batch, *, last: bool) -> torch.Tensor:
        """One batch, the step fit and lr_find share: augment, forward (mixed up), backward;
        on the ``last`` batch of an accumulation the optimizer and schedule step. The loss."""
        f = self.fabric
        images = batch[0].to(f.device, non_blocking=True)
        labels = batch[1].to(f.device, non_blocking=True)  # blocking: waits for the GPU
        x = _model_input(step.augment, images, step.cfg, train=True, generator=step.gens[0])
        smoothing = step.cfg.label_smoothing
        with f.no_backward_sync(step.model, enabled=not last), f.autocast():
            if step.mixup > 0:
                x, y2, lam = mixup_batch(x, labels, step.mixup, step.gens[1])
                loss = mixup_loss(step.forward(x), labels, y2, lam, smoothing)
            else:
                loss = _loss(step.forward(x), labels, smoothing)
        f.backward(loss / step.grad_accum)
        if last:
            step.opt.step()
            step.opt.zero_grad(set_to_none=True)
            step.sched.step()
        return loss.detach()

    def fingerprint(
        self,
        train: ShardedImages,
        cfg: StageConfig,
        lr: Any,
        optimizer: str | None = None,
        *,
        unused: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """What this stage's (or sweep's) result on ``train``'s shards is computed from.

        ``unused``: settings of ``cfg`` the computation does not read (left out, so that
        changing one of them does not redo it)."""
        settings = asdict(cfg)
        settings.pop("lr")  # a part of its own: the rate actually used
        for key in unused:
            settings.pop(key)
        for key in ("num_workers", "persistent_workers", "pin_memory", "prefetch_factor"):
            settings["loader"].pop(key, None)  # they change nothing in the result
        return fingerprint(
            settings=settings,
            lr=lr,
            shards=train.content,
            start=weights_digest(self.model.state_dict()),
            precision=str(self.fabric.strategy.precision.precision),
            device=self.fabric.device.type,
            world_size=self.fabric.world_size,
            optimizer=optimizer,
        )

    # ---- lr_find -------------------------------------------------------------------------
    def lr_find(
        self,
        train: ShardedImages,
        cfg: StageConfig,
        options: LrFindOptions,
        *,
        cache_file: Path | None = None,
    ) -> dict[str, Any]:
        """fastai's ``lr_find``: sweep, stop on divergence, restore the weights, suggest.

        With ``cache_file``, a sweep stored there from the same inputs (the fingerprint of
        :meth:`fit`, with the sweep's options) is returned instead of sweeping again, so a
        resumed run keeps its suggestion and the stages trained with it stay valid.
        """
        # the options the sweep reads (a subclass's own fields are not among them)
        swept = {o.name: getattr(options, o.name) for o in fields(LrFindOptions)}
        fp = self.fingerprint(train, cfg, swept, unused=SWEEP_UNUSED)
        if cache_file is not None:
            cached = load_sweep(cache_file, fp)
            if cached is not None:
                return cached
        result = self.sweep(train, cfg, options)
        if cache_file is not None and self.fabric.is_global_zero:
            save_sweep(cache_file, fp, result)
        return result

    def sweep(self, train: ShardedImages, cfg: StageConfig, options: LrFindOptions):
        """fastai's ``LRFinder``: a short fit (the same batch step) with an exponential
        schedule from ``start_lr`` to ``end_lr`` over ``num_it`` batches, stopped when the
        smoothed loss passes 4x its best or is NaN; the weights are put back afterwards."""
        started = time.perf_counter()
        (freeze if cfg.freeze else unfreeze)(self.model)
        saved = copy.deepcopy(self.model.state_dict())
        step = self._setup(
            cfg,
            self._optimizer(cfg, options.start_lr),
            lambda o: ExponentialScheduler(o, options),
            carried=None,
            mixup=0.0,
            grad_accum=1,
            compile=False,
        )
        tr_loader, _ = self.loaders(train, train, cfg)
        smooth, best = SmoothLoss(options.beta), math.inf
        lrs, losses = [], []
        step.model.train()
        for batch in _batches(tr_loader, options.num_it):
            lrs.append(step.opt.param_groups[-1]["lr"])
            losses.append(smooth.update(float(self._train_batch(step, batch, last=True))))
            best = min(best, losses[-1])
            if options.stop_div and (losses[-1] > 4 * best or math.isnan(losses[-1])):
                break
        self.model.load_state_dict(saved)
        suggestion = suggest_valley(lrs, losses, options.num_it)
        logger.info(
            "lr_find: %d steps in %.1f s, suggested lr (valley) %.3g. The sweep is kept and reused "
            "while its inputs are equal; to skip it, give the stages a fixed rate instead of "
            'lr: auto (e.g. --params="frozen.train.lr=%.2g")',
            len(lrs),
            time.perf_counter() - started,
            suggestion,
            suggestion,
        )
        return {"lrs": lrs, "losses": losses, "suggestion": suggestion, "num_it": options.num_it}


def _batches(loader, limit: int):
    """``limit`` batches of ``loader``, epoch after epoch (each epoch's order its own)."""
    n, epoch = 0, 0
    while True:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield batch
            n += 1
            if n >= limit:
                return
        epoch += 1


def _model_input(
    augment: BatchAugment,
    images: torch.Tensor,
    cfg: StageConfig,
    *,
    train: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment (or only resize) a uint8 batch and lay it out as the model expects."""
    x = augment(images, train=train, generator=generator)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def _sync_buffers(fabric, model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (DDP syncs them only before a forward)."""
    if fabric.world_size > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name and bytes: equal for equal weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in state_dict.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _header() -> str:
    return f"{'epoch':>5} {'train_loss':>10} {'valid_loss':>10} {'accuracy':>8} {'time':>6}"


def _row(r: dict[str, Any]) -> str:
    m, s = divmod(round(r["seconds"]), 60)
    return (
        f"{r['epoch']:>5} {r['train_loss']:>10.6f} {r['valid_loss']:>10.6f} "
        f"{r['accuracy']:>8.6f} {m:02d}:{s:02d}"
    )


def _progress(loader, enabled: bool, desc: str):
    """The loader's batches, behind a progress bar when ``enabled`` (and stderr is a TTY).

    No display setting may change a result: the loader's iterator is made here, once, as
    without the bar (``tqdm.auto``'s class calls ``iter()`` on what it wraps, and a second
    DataLoader iterator draws its base seed from torch's global generator, which dropout then
    continues from), and the bar is built with that generator's state set aside.
    """
    batches = iter(loader)
    if not enabled:
        return batches
    with torch.random.fork_rng(devices=[]):
        return tqdm(batches, total=len(loader), desc=desc, leave=False, mininterval=1.0,
                    disable=None)  # fmt: skip  # off without a TTY
