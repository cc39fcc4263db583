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
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .allocator import DEFAULT_MODE
from .atomic import write_atomic
from .augment import AugmentOptions, BatchAugment
from .data import CroppedItems, EpochSampler, LoaderOptions, make_loader
from .integrity import (
    IntegrityError,
    NoDigestError,
    content_sha256,
    display_path,
    load_checkpoint,
    save_checkpoint,
)
from .kept import KEPT_FOLDER, KeepPolicy, Kept
from .models import Stats, freeze, no_decay_params, param_groups, unfreeze
from .provenance import digest, explain, fingerprint, stage_seed
from .schedule import (
    LrFindOptions,
    OneCycle,
    OneCycleScheduler,
    SmoothLoss,
    discriminative_lrs,
    lr_at,
    suggest_valley,
)
from .shards import ShardedImages

logger = logging.getLogger(__name__)

OPTIMIZER_STATES = ("fastai", "reset")
CHECKPOINT_VERSION = 2  # 2: fingerprints record every input (provenance)
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
    "cycle",
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

    name: str
    epochs: int
    lr: (
        float | tuple[float, ...]
    )  # one rate; (low, high) spread over the groups; (high,) = slice(high)
    freeze: bool = True  # train the head (and BatchNorm) only
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    cycle: OneCycle = field(default_factory=OneCycle)
    loader: LoaderOptions = field(default_factory=LoaderOptions)
    wd: float = 0.01  # fastai's default weight decay, decoupled (AdamW)
    betas: tuple[float, float] = (0.9, 0.99)  # fastai's Adam betas (beta1 is then cycled)
    eps: float = 1e-5  # fastai's Adam eps
    mixup: float = 0.0  # MixUp alpha; 0 = off
    label_smoothing: float = 0.0  # 0 = plain cross-entropy
    # SaveModelCallback's metric: the epoch with the best accuracy (max) or valid_loss (min)
    # is kept; last: the last epoch, as fastai's fit_one_cycle and fine_tune without the callback
    monitor: str = "accuracy"
    grad_accum: int = 1  # batches per optimizer step
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    seed: int = 42
    validate_before: bool = False  # one validation pass before the first epoch (fastai: none)
    # AdamW's state at the start: "fastai" carries the previous stage's (its moving averages and
    # step count) when the same parameters train, as fastai's Learner keeps one optimizer and
    # clears its state only on freeze/unfreeze; "reset": a fresh optimizer every stage.
    optimizer_state: str = "fastai"

    def __post_init__(self) -> None:
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(
                f"{self.name}: optimizer_state must be one of {', '.join(OPTIMIZER_STATES)}, "
                f"not {self.optimizer_state!r}"
            )


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how to run: Lightning Fabric's accelerator, devices, strategy and precision."""

    accelerator: str = "auto"  # cpu, cuda or auto
    devices: int = 1  # > 1: data-parallel (DDP) from inside the node
    precision: str = "32-true"  # 32-true, bf16-mixed or 16-mixed
    num_nodes: int = 1  # several machines: launch with torchrun (see README)
    strategy: str = "auto"  # auto: ddp when devices * num_nodes > 1
    progress: bool = True  # a batch progress bar
    malloc: str = DEFAULT_MODE  # glibc malloc settings for CPU tensors (vision/allocator.py)
    # earlier runs of each stage kept for reuse when their settings come back (vision/kept.py)
    keep: KeepPolicy = field(default_factory=KeepPolicy)


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


def fine_tune_stages(
    base: StageConfig,
    epochs: int,
    base_lr: float = 2e-3,
    *,
    freeze_epochs: int = 1,
    lr_mult: float = 100,
    pct_start: float = 0.3,
    div: float = 5.0,
) -> tuple[StageConfig, StageConfig]:
    """fastai's ``fine_tune`` as two stages to fit in turn.

    Frozen ``fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)``, then unfrozen
    ``fit_one_cycle(epochs, slice(base_lr/2/lr_mult, base_lr/2), pct_start, div)``.
    """
    frozen = replace(
        base,
        name=f"{base.name}_frozen",
        epochs=freeze_epochs,
        lr=(base_lr,),
        freeze=True,
        cycle=replace(base.cycle, pct_start=0.99),
    )
    half = base_lr / 2
    unfrozen = replace(
        base,
        name=f"{base.name}_unfrozen",
        epochs=epochs,
        lr=(half / lr_mult, half),
        freeze=False,
        cycle=replace(base.cycle, pct_start=pct_start, div=div),
    )
    return frozen, unfrozen


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
    own = _cpu(state["state"])
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


def _cpu(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor cloned onto the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


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
        stop_after_epochs: int | None = None,
        carried_optimizer: dict[str, Any] | None = None,
    ) -> StageResult:
        """``fit_one_cycle(cfg.epochs, cfg.lr)`` with the stage's freezing, mixup and options.

        Resumes from ``checkpoint_dir/last.pt`` when its fingerprint equals this run's (the
        settings, learning rate, shards' content, starting weights, precision, device type,
        world size, code and package versions): an unfinished one goes on from its last epoch,
        a finished one is returned as it is (same inputs: the same result). Otherwise one log
        line says which input differs, and the stage trains from the start.
        ``stop_after_epochs`` simulates an interruption (tests).

        ``carried_optimizer`` (``{"freeze": bool, "state": AdamW state_dict}``): the previous
        stage's optimizer state after its last epoch. With ``cfg.optimizer_state: fastai`` it is
        the starting state when that stage trained the same parameters (same ``freeze``), as
        fastai's Learner keeps its optimizer across ``fit_one_cycle`` calls and clears it only on
        freeze/unfreeze; otherwise AdamW starts fresh.
        """
        f = self.fabric
        (freeze if cfg.freeze else unfreeze)(self.model)
        lrs = discriminative_lrs(cfg.lr, len(param_groups(self.model)))
        if cfg.channels_last:  # before DDP wraps it: gradient buckets follow the layout
            self.model.to(memory_format=torch.channels_last)
        opt = make_optimizer(self.model, lrs, cfg)
        carried = carried_state(carried_optimizer, cfg, opt)
        fp = self.fingerprint(
            train, cfg, cfg.lr, optimizer=optimizer_digest(carried) if carried else "fresh"
        )
        seed = stage_seed(cfg.seed, cfg.name)
        torch.manual_seed(seed)
        model, opt = f.setup(self.model, opt)
        if carried is not None:  # after setup: the state goes to the parameters' device
            load_optimizer_state(opt, carried)
            if f.is_global_zero:
                logger.info("%s: AdamW goes on from the previous stage's state", cfg.name)
        step_model = torch.compile(model) if cfg.compile else model
        tr_loader, va_loader = self.loaders(train, valid, cfg)
        steps_per_epoch = max(1, len(tr_loader) // cfg.grad_accum)
        sched = OneCycleScheduler(opt, cfg.epochs * steps_per_epoch, cfg.cycle)
        augment = BatchAugment(cfg.augment, self.stats.mean, self.stats.std)
        gen = torch.Generator(device=f.device).manual_seed(seed + 7919 * f.global_rank)
        mix_gen = torch.Generator().manual_seed(seed + 104729 * f.global_rank)

        state = {
            "epoch": 0,
            "history": [],
            "best": None,
            "best_metric": None,
            "best_epoch": -1,
            "smooth": [0.0, 0],  # fastai's running train loss carries across epochs
            "start_metrics": {},
        }
        ckpt = checkpoint_dir / "last.pt" if checkpoint_dir is not None else None
        found = _agreed_resume_file(f, checkpoint_dir, cfg.name, fp, self.keep) if ckpt else None
        if found is not None:
            path, saved = found
            reason = explain(saved.get("fingerprint"), fp)
            kept = ""
            if reason is not None and f.is_global_zero:  # kept for when its settings return
                where = _keep_resume_files(checkpoint_dir, path, saved, self.keep)
                kept = f" (that run is kept as {display_path(where)})" if where else ""
            if reason is None:
                _restore(saved, model, opt, sched, gen, mix_gen)
                state = {k: saved[k] for k in state}
                done = "finished; reusing it" if state["epoch"] >= cfg.epochs else "resuming"
                logger.info(
                    "%s: %s holds this run after epoch %d: %s",
                    cfg.name,
                    display_path(path),
                    state["epoch"],
                    done,
                )
            elif f.is_global_zero:
                logger.info(
                    "%s: %s %s; training from the start%s",
                    cfg.name,
                    display_path(path),
                    reason,
                    kept,
                )

        maximize = cfg.monitor != "valid_loss"
        smooth = SmoothLoss()
        smooth.avg, smooth.count = float(state["smooth"][0]), int(state["smooth"][1])
        if state["epoch"] == 0 and cfg.validate_before:
            # Where the stage starts from (e.g. the untrained head's accuracy): a full
            # validation pass, which fastai does not make, so it is off by default.
            _sync_buffers(f, _raw(model))
            state["start_metrics"] = self.validate(va_loader, augment, cfg)
            if f.is_global_zero:
                start = state["start_metrics"]
                logger.info(
                    "%s: before training: valid_loss %.6f, accuracy %.6f",
                    cfg.name,
                    start["valid_loss"],
                    start["accuracy"],
                )
        if state["epoch"] == 0 and f.is_global_zero:
            logger.info("%s: %s", cfg.name, _header())
        for epoch in range(state["epoch"], cfg.epochs):
            if stop_after_epochs is not None and epoch >= stop_after_epochs:
                break
            t0 = time.perf_counter()
            model.train()
            tr_loader.sampler.set_epoch(epoch)
            opt.zero_grad(set_to_none=True)
            batches = _progress(tr_loader, self.progress, f"{cfg.name} {epoch}")
            shown = -math.inf  # when the progress bar last showed the loss
            n_batches = steps_per_epoch * cfg.grad_accum
            for i, (batch_x, batch_y) in enumerate(batches):
                if i >= n_batches:
                    break
                images = batch_x.to(f.device, non_blocking=True)
                labels = batch_y.to(f.device, non_blocking=True)  # blocking: waits for the GPU
                x = _model_input(augment, images, cfg, train=True, generator=gen)
                last = (i + 1) % cfg.grad_accum == 0
                with f.no_backward_sync(model, enabled=not last), f.autocast():
                    if cfg.mixup > 0:
                        x, y2, lam = mixup_batch(x, labels, cfg.mixup, mix_gen)
                        logits = step_model(x)
                        loss = mixup_loss(logits, labels, y2, lam, cfg.label_smoothing)
                    else:
                        logits = step_model(x)
                        loss = _loss(logits, labels, cfg.label_smoothing)
                f.backward(loss / cfg.grad_accum)
                # On the device: reading the loss each step would make the CPU wait for the GPU
                # before it queues the next batch (about 30% of a step on an H200, gpu_check)
                smooth.update(loss.detach().double())
                if last:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                if self.progress and hasattr(batches, "set_postfix"):
                    now = time.monotonic()
                    if now - shown >= POSTFIX_SECONDS or i + 1 == n_batches:  # read rarely
                        batches.set_postfix(loss=f"{smooth.value:.4f}")
                        shown = now
            _sync_buffers(f, _raw(model))
            metrics = self.validate(va_loader, augment, cfg)
            row = {
                "stage": cfg.name,
                "epoch": epoch,
                "train_loss": smooth.value,
                **metrics,
                "lr": float(opt.param_groups[-1]["lr"]),
                "seconds": time.perf_counter() - t0,
            }
            state["history"].append(row)
            if cfg.monitor == "last":  # fit_one_cycle without SaveModelCallback: no copies
                state["best_metric"], state["best_epoch"] = row["accuracy"], epoch
            else:
                value = row[cfg.monitor]
                better = state["best_metric"] is None or (
                    value > state["best_metric"] if maximize else value < state["best_metric"]
                )
                if better and not math.isnan(value):
                    state["best_metric"], state["best_epoch"] = value, epoch
                    state["best"] = _cpu(_raw(model).state_dict())
            state["epoch"] = epoch + 1
            state["smooth"] = [float(smooth.avg), smooth.count]
            if f.is_global_zero:
                logger.info("%s: %s", cfg.name, _row(row))
                if ckpt is not None:
                    _save_resume(_snapshot(state, fp, model, opt, sched, gen, mix_gen), ckpt)
            if on_epoch is not None and f.is_global_zero:
                on_epoch(row)
            f.barrier()
        if state["best"] is None:  # monitor: last, or no finite metric (empty validation)
            state["best"] = _cpu(_raw(model).state_dict())
            state["best_epoch"] = state["epoch"] - 1
        if state["best_epoch"] >= 0 and f.is_global_zero:
            logger.info(
                "%s: kept epoch %d of %d (monitor: %s), %s %.6f",
                cfg.name,
                state["best_epoch"],
                cfg.epochs,
                cfg.monitor,
                "accuracy" if cfg.monitor == "last" else cfg.monitor,
                state["best_metric"] if state["best_metric"] is not None else math.nan,
            )
        _raw(model).load_state_dict(state["best"])
        return StageResult(
            state["best"],
            state["history"],
            state["best_epoch"],
            state["best_metric"] if state["best_metric"] is not None else math.nan,
            state["start_metrics"],
            train.content,
            # after the last epoch, as fastai's (SaveModelCallback reloads weights, not state)
            _cpu(opt.state_dict()),
        )

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
        fp = self.fingerprint(train, cfg, asdict(options), unused=SWEEP_UNUSED)
        if cache_file is not None:
            cached = _load_sweep(cache_file, fp)
            if cached is not None:
                return cached
        result = self._sweep(train, cfg, options)
        if cache_file is not None and self.fabric.is_global_zero:
            body = {"fingerprint": fp, "result": result}
            payload = json.dumps({**body, "sha256": content_sha256(body)}).encode()
            _save_atomic(payload, cache_file)
        return result

    def _sweep(self, train: ShardedImages, cfg: StageConfig, options: LrFindOptions):
        f = self.fabric
        started = time.perf_counter()
        seed = stage_seed(cfg.seed, cfg.name)
        torch.manual_seed(seed)
        (freeze if cfg.freeze else unfreeze)(self.model)
        saved = copy.deepcopy(self.model.state_dict())
        n_groups = len(param_groups(self.model))
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        opt = make_optimizer(self.model, [options.start_lr] * n_groups, cfg)
        model, opt = f.setup(self.model, opt)
        tr_loader, _ = self.loaders(train, train, cfg)
        augment = BatchAugment(cfg.augment, self.stats.mean, self.stats.std)
        gen = torch.Generator(device=f.device).manual_seed(seed)
        smooth, best = SmoothLoss(options.beta), math.inf
        lrs, losses = [], []
        model.train()
        it, epoch = 0, 0
        while it < options.num_it:
            tr_loader.sampler.set_epoch(epoch)
            for batch_x, batch_y in tr_loader:
                lr = lr_at(it, options)
                for g in opt.param_groups:
                    g["lr"] = lr
                images, labels = batch_x.to(f.device), batch_y.to(f.device)
                x = _model_input(augment, images, cfg, train=True, generator=gen)
                with f.autocast():
                    loss = _loss(model(x), labels, cfg.label_smoothing)
                f.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
                s = smooth.update(float(loss.detach()))
                lrs.append(lr)
                losses.append(s)
                it += 1
                best = min(best, s)
                if (options.stop_div and (s > 4 * best or math.isnan(s))) or it >= options.num_it:
                    break
            else:
                epoch += 1
                continue
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


def _raw(model: nn.Module) -> nn.Module:
    """The plain module under Fabric's (and DDP's) wrappers."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name and bytes: equal for equal weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in state_dict.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_sweep(path: Path, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The sweep stored in ``path`` if it is intact and was computed from ``fp``; else None."""
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        body = {"fingerprint": stored["fingerprint"], "result": stored["result"]}
        intact = stored["sha256"] == content_sha256(body)
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        logger.warning(
            "lr_find: %s is damaged (its content does not match its sha256); sweeping again",
            display_path(path),
        )
        return None
    reason = explain(stored["fingerprint"], fp)
    if reason is not None:
        logger.info("lr_find: %s %s; sweeping again", display_path(path), reason)
        return None
    logger.info(
        "lr_find: %s holds this sweep (same inputs): suggested lr (valley) %.3g, reusing it",
        display_path(path),
        stored["result"]["suggestion"],
    )
    return stored["result"]


def _snapshot(state, fingerprint, model, opt, sched, gen, mix_gen) -> dict[str, Any]:
    return {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        **state,
        "model": _raw(model).state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "aug_rng": gen.get_state(),
        "mix_rng": mix_gen.get_state(),
    }


def _restore(saved, model, opt, sched, gen, mix_gen) -> None:
    _raw(model).load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    gen.set_state(saved["aug_rng"])
    mix_gen.set_state(saved["mix_rng"])


RESUME_FILES = ("last.pt", "prev.pt")  # this epoch's state, and the one before it


def _agreed_resume_file(
    fabric, folder: Path, name: str, fp: dict[str, Any], keep: KeepPolicy
) -> tuple[Path, dict[str, Any]] | None:
    """The resume file every rank uses: rank 0 chooses (setting a damaged one aside, bringing
    back a kept run of these inputs) and the others load the one it names, so that no two
    ranks decide differently."""
    if fabric.world_size == 1:
        return _choose_resume_file(folder, name, fp, keep)
    found = _choose_resume_file(folder, name, fp, keep) if fabric.is_global_zero else None
    choice = fabric.broadcast(found[0].name if found is not None else None, src=0)
    if fabric.is_global_zero or choice is None:
        return found
    path = folder / choice
    return path, load_checkpoint(path, todo="rank 0 verified it a moment ago; rerun the stage")


def _resume_file(folder: Path, name: str, log: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact resume file of ``folder`` and its content, or None.

    A damaged one (its content does not match its sha256, truncated, foreign) is set aside as
    ``*.corrupt`` with a warning, and the previous epoch's file is tried instead.
    """
    for file in RESUME_FILES:
        path = folder / file
        if not path.exists():
            continue
        try:
            return path, load_checkpoint(path, todo="It is not used")
        except NoDigestError:
            if log:
                logger.info(
                    "%s: %s has no record of its inputs (an older version); training "
                    "from the start",
                    name,
                    display_path(path),
                )
            return None
        except IntegrityError as e:
            corrupt = path.with_name(f"{path.name}.corrupt")
            if log:
                os.replace(path, corrupt)
                logger.warning(
                    "%s: %s is damaged (%s); set aside as %s, resuming from the state before it",
                    name,
                    display_path(path),
                    e.problem,
                    corrupt.name,
                )
    return None


def _choose_resume_file(
    folder: Path, name: str, fp: dict[str, Any], keep: KeepPolicy
) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact resume file; when it comes from other inputs than ``fp`` and a run
    from ``fp``'s was kept (:mod:`.kept`), that one is put back in its place first (and the
    other kept in turn)."""
    found = _resume_file(folder, name, True)
    if found is not None and explain(found[1].get("fingerprint"), fp) is None:
        return found
    kept = Kept(folder / KEPT_FOLDER, keep, ".pt")
    match = kept.take(digest(fp))
    if match is None:
        return found
    if found is not None:
        _keep_resume_files(folder, found[0], found[1], keep)
    last = folder / RESUME_FILES[0]
    os.replace(match, last)
    logger.info(
        "%s: %s held a run from these same inputs (kept when they last changed); back in place",
        name,
        display_path(match),
    )
    return _resume_file(folder, name, True)


def _keep_resume_files(
    folder: Path, path: Path, saved: dict[str, Any], keep: KeepPolicy
) -> Path | None:
    """Move a resume file from other inputs into the kept folder, under its fingerprint; the
    older epoch's file beside it goes (it is of the same run). Where it went, or None."""
    fp = saved.get("fingerprint")
    if not isinstance(fp, dict):  # an older version's file: no record of its inputs
        return None
    where = Kept(folder / KEPT_FOLDER, keep, ".pt").store(path, digest(fp))
    for file in RESUME_FILES:
        (folder / file).unlink(missing_ok=True)
    return where


def _save_resume(state: dict[str, Any], path: Path) -> None:
    """Write this epoch's resume file with its sha256; the previous one becomes prev.pt."""
    _save_atomic(state, path, keep_previous=path.with_name(RESUME_FILES[1]))


def _save_atomic(obj: Any, path: Path, *, keep_previous: Path | None = None) -> None:
    """A checkpoint with its sha256 (or bytes as they are), written atomically."""
    if isinstance(obj, bytes):
        write_atomic(path, lambda fh: fh.write(obj), keep_previous=keep_previous)
    else:
        write_atomic(path, lambda fh: save_checkpoint(obj, fh), keep_previous=keep_previous)


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
