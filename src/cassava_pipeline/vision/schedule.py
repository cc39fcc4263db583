"""fastai's one-cycle schedule, lr_find sweep and valley suggestion, as plain functions.

``fit_one_cycle(n_epoch, lr_max, div=25, div_final=1e5, pct_start=0.25, moms=(0.95, 0.85, 0.95))``
anneals the learning rate with a cosine from ``lr_max/div`` up to ``lr_max`` over the first
``pct_start`` of the steps, then with a cosine down to ``lr_max/div_final``; the momentum (Adam's
first beta) goes 0.95 -> 0.85 -> 0.95 the same way. At step ``i`` of ``total`` the position is
``i / total``, as fastai's ``ParamScheduler`` computes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from annotated_types import Ge

from .options import STRICT, Fraction, OpenFraction, OptionError, PositiveFloat


def sched_cos(start: float, end: float, pos: float) -> float:
    """fastai's SchedCos: cosine from ``start`` (pos 0) to ``end`` (pos 1)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def combined_cos(pct: float, start: float, middle: float, end: float, pos: float) -> float:
    """fastai's combined_cos: start -> middle over ``pct`` of the run, then middle -> end.

    As fastai's ``combine_scheds``, the phase boundaries are a float32 tensor, so the position
    within a phase is computed in float32 (a few 1e-6 of the rate late in a cycle).
    """
    f32 = np.float32  # the same IEEE float32 arithmetic as fastai's tensor, at 1/30 the cost
    bounds = (f32(0.0), f32(pct), f32(f32(pct) + f32(1 - pct)))  # torch.cumsum in float32
    at = f32(pos)
    idx = 1 if at >= bounds[1] else 0
    within = float((at - bounds[idx]) / (bounds[idx + 1] - bounds[idx]))
    return sched_cos(*((start, middle) if idx == 0 else (middle, end)), within)


@dataclass(frozen=True)
class OneCycle:
    """fastai's ``fit_one_cycle`` hyper-parameters."""

    __pydantic_config__ = STRICT

    div: PositiveFloat = 25.0  # start at lr_max / 25
    div_final: PositiveFloat = 1e5  # end at lr_max / 1e5
    pct_start: Fraction = 0.25  # warm-up share of the steps
    moms: tuple[Fraction, Fraction, Fraction] = (0.95, 0.85, 0.95)  # beta1 start, middle, end

    def lr_factor(self, step: int, total: int) -> float:
        """Learning rate at ``step`` as a multiple of ``lr_max`` (every group scales alike)."""
        return combined_cos(self.pct_start, 1 / self.div, 1.0, 1 / self.div_final, step / total)

    def momentum(self, step: int, total: int) -> float:
        """Adam's beta1 at ``step``."""
        return combined_cos(self.pct_start, *self.moms, step / total)


class OneCycleScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Applies :class:`OneCycle` to an optimizer: each group's lr and beta1, per step.

    A torch ``LRScheduler``, so its position is saved and restored with ``state_dict``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cycle: OneCycle):
        self.total_steps = max(1, total_steps)
        self.cycle = cycle
        super().__init__(optimizer)

    def state_dict(self) -> dict:
        """Plain values only (the cycle is configuration), so ``weights_only`` loads it."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "cycle")}

    def get_lr(self) -> list[float]:
        step = min(self.last_epoch, self.total_steps - 1)
        factor = self.cycle.lr_factor(step, self.total_steps)
        mom = self.cycle.momentum(step, self.total_steps)
        for group in self.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (mom, group["betas"][1])
        return [base * factor for base in self.base_lrs]


def discriminative_lrs(lr: float | Sequence[float], n_groups: int) -> list[float]:
    """fastai's ``slice(low, high)``: ``n_groups`` rates spread geometrically from low to high.

    A single number gives every group that rate; fastai's ``slice(high)`` (one number in a list)
    gives the last group ``high`` and the others ``high / 10``.
    """
    if isinstance(lr, int | float):
        return [float(lr)] * n_groups
    lr = list(lr)
    if len(lr) == 1:
        return [lr[0] / 10] * (n_groups - 1) + [lr[0]]
    low, high = float(lr[0]), float(lr[1])
    if n_groups == 1:
        return [high]
    return [float(v) for v in np.geomspace(low, high, n_groups)]


@dataclass(frozen=True)
class LrFindOptions:
    """fastai's ``lr_find`` defaults."""

    __pydantic_config__ = STRICT

    start_lr: PositiveFloat = 1e-7
    end_lr: PositiveFloat = 10.0
    num_it: Annotated[int, Ge(2)] = 100
    stop_div: bool = True  # stop when the smoothed loss passes 4x its best
    beta: OpenFraction = 0.98  # loss smoothing (fastai's Recorder)

    def __post_init__(self) -> None:
        if self.end_lr <= self.start_lr:
            reason = f"end_lr ({self.end_lr}) must exceed start_lr ({self.start_lr})"
            raise OptionError("end_lr", self.end_lr, reason, "lr_find")


def lr_at(i: int, options: LrFindOptions) -> float:
    """Exponential sweep (fastai's SchedExp) at iteration ``i``."""
    pos = i / options.num_it
    return options.start_lr * (options.end_lr / options.start_lr) ** pos


class ExponentialScheduler(torch.optim.lr_scheduler.LRScheduler):
    """lr_find's schedule (fastai's ``SchedExp``): every group at :func:`lr_at` of the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, options: LrFindOptions):
        self.options = options
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr_at(self.last_epoch, self.options)] * len(self.optimizer.param_groups)


class SmoothLoss:
    """fastai's debiased exponential moving average of the loss.

    ``update`` takes a Python float or a float64 tensor: a tensor keeps the average on its
    device, so a training step need not wait for the GPU to read its loss (the same float64
    operations in the same order: the same values, bit for bit). :attr:`value` reads it."""

    def __init__(self, beta: float = 0.98):
        self.beta, self.avg, self.count = beta, 0.0, 0

    def update(self, loss: float | torch.Tensor) -> float | torch.Tensor:
        self.count += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        return self.avg / (1 - self.beta**self.count)

    @property
    def value(self) -> float:
        """The debiased average as a Python float (NaN before the first update)."""
        if not self.count:
            return math.nan
        return float(self.avg) / (1 - self.beta**self.count)


def valley(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, int]:
    """fastai's ``valley`` suggestion: the longest descending run of the loss curve.

    Returns (suggested lr, its index). fastai first drops the first tenth and last five points
    of the curve (:func:`suggest_valley` does).
    """
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), idx


def slide(
    lrs: Sequence[float],
    losses: Sequence[float],
    lr_diff: int = 15,
    thresh: float = 0.005,
    adjust_value: float = 1.0,
) -> float:
    """fastai's ``slide`` suggestion: walk left from the end until the loss gradient ``lr_diff``
    points apart differs by at most ``thresh``."""
    grad = np.gradient(np.asarray(losses, dtype=np.float32))
    r_idx, l_idx = -1, -1 - lr_diff
    local_min_lr = lrs[l_idx]
    while l_idx >= -len(losses) and abs(grad[r_idx] - grad[l_idx]) > thresh:
        local_min_lr = lrs[l_idx]
        r_idx -= 1
        l_idx -= 1
    return float(local_min_lr) * adjust_value


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's ``minimum`` suggestion: a tenth of the lr at the lowest loss."""
    return float(lrs[int(np.argmin(np.asarray(losses, dtype=np.float32)))]) / 10


def steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's ``steep`` suggestion: the lr where the loss falls fastest (per log-lr)."""
    lr = torch.tensor(list(lrs), dtype=torch.float32)
    loss = torch.tensor(list(losses), dtype=torch.float32)
    grads = (loss[1:] - loss[:-1]) / (lr[1:].log() - lr[:-1].log())
    return float(lr[grads.argmin()])


SUGGESTIONS = {
    "valley": lambda lrs, losses: valley(lrs, losses)[0],
    "slide": slide,
    "minimum": minimum,
    "steep": steep,
}


def suggest(lrs: Sequence[float], losses: Sequence[float], num_it: int, method: str = "valley"):
    """fastai's ``lr_find`` suggestion ``method`` (valley, slide, minimum, steep): the curve
    trimmed of its first tenth and last five points, cut at the first NaN, in float32 as fastai
    holds it (so ties and the returned rate are fastai's)."""
    if method not in SUGGESTIONS:
        raise ValueError(f"lr_find suggestion {method!r}: use one of {', '.join(SUGGESTIONS)}")
    as32 = lambda v: torch.tensor(list(v), dtype=torch.float32).tolist()  # noqa: E731
    lrs, losses = as32(list(lrs)[num_it // 10 : -5]), as32(list(losses)[num_it // 10 : -5])
    for i, loss in enumerate(losses):
        if math.isnan(loss):
            lrs, losses = lrs[:i], losses[:i]
            break
    if len(losses) < 2:
        raise ValueError(
            f"lr_find recorded too few points ({len(losses)}) to suggest a learning rate; "
            "raise lr_find.num_it or use more training data"
        )
    return float(SUGGESTIONS[method](lrs, losses))


def suggest_valley(lrs: Sequence[float], losses: Sequence[float], num_it: int) -> float:
    """fastai's default ``lr_find`` suggestion (:func:`suggest` with ``valley``)."""
    return suggest(lrs, losses, num_it, "valley")
