"""fastai's one-cycle schedule, discriminative rates and lr_find's valley, value by value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cassava_pipeline.vision.schedule import (
    LrFindOptions,
    OneCycle,
    OneCycleScheduler,
    SmoothLoss,
    discriminative_lrs,
    lr_at,
    suggest_valley,
    valley,
)


def run_schedule(total: int, lrs: list[float]) -> tuple[list[list[float]], list[float]]:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.AdamW(
        [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)], betas=(0.9, 0.99)
    )
    sched = OneCycleScheduler(opt, total, OneCycle())
    seen_lr, seen_mom = [], []
    for _ in range(total):
        seen_lr.append([g["lr"] for g in opt.param_groups])
        seen_mom.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    return seen_lr, seen_mom


def test_one_cycle_matches_fastai_formulas():
    lr_max, total = 1e-3, 100
    lrs, moms = run_schedule(total, [lr_max])
    # step 0: lr_max / div, first momentum
    assert lrs[0][0] == pytest.approx(lr_max / 25) and moms[0] == pytest.approx(0.95)
    # pct_start: the peak
    assert lrs[25][0] == pytest.approx(lr_max) and moms[25] == pytest.approx(0.85)
    # halfway through warm-up: cosine midpoint between lr_max/25 and lr_max
    assert lrs[12][0] == pytest.approx(
        lr_max / 25 + (1 + math.cos(math.pi * (1 - 12 / 25))) * (lr_max - lr_max / 25) / 2
    )
    # step 50: a third of the annealing phase
    pos = (0.5 - 0.25) / 0.75
    expect = lr_max + (1 + math.cos(math.pi * (1 - pos))) * (lr_max / 1e5 - lr_max) / 2
    assert lrs[50][0] == pytest.approx(expect)
    assert moms[50] == pytest.approx(0.85 + (1 + math.cos(math.pi * (1 - pos))) * 0.1 / 2)
    # last step: close to lr_max / 1e5, momentum back near 0.95
    pos = (99 / 100 - 0.25) / 0.75
    assert lrs[99][0] == pytest.approx(
        lr_max + (1 + math.cos(math.pi * (1 - pos))) * (lr_max / 1e5 - lr_max) / 2
    )
    assert moms[99] > 0.949


def test_every_group_follows_its_own_max():
    lrs, _ = run_schedule(40, [1e-6, 1e-5, 1e-4])
    assert lrs[10] == pytest.approx([1e-6, 1e-5, 1e-4])  # the peak (pos 0.25)
    assert lrs[0] == pytest.approx([1e-6 / 25, 1e-5 / 25, 1e-4 / 25])


def test_discriminative_lrs_like_fastai_slice():
    assert discriminative_lrs((1e-6, 1e-4), 3) == pytest.approx([1e-6, 1e-5, 1e-4])
    assert discriminative_lrs((1e-6, 1e-4), 2) == pytest.approx([1e-6, 1e-4])
    assert discriminative_lrs(2e-3, 3) == [2e-3] * 3
    assert discriminative_lrs([1e-3], 3) == pytest.approx([1e-4, 1e-4, 1e-3])


def test_exponential_sweep_and_smoothing():
    o = LrFindOptions()
    assert lr_at(0, o) == pytest.approx(1e-7) and lr_at(100, o) == pytest.approx(10.0)
    assert lr_at(50, o) == pytest.approx(math.sqrt(1e-7 * 10))
    s = SmoothLoss(0.98)
    assert s.update(2.0) == pytest.approx(2.0)  # debiased: the first value is itself
    assert s.update(1.0) == pytest.approx((0.98 * 0.02 * 2 + 0.02) / (1 - 0.98**2))


def test_valley_on_a_synthetic_curve():
    # flat, then a long descent from index 20 to 70, then divergence
    losses = [3.0] * 20 + list(np.linspace(3.0, 1.0, 51)) + list(np.linspace(1.1, 5.0, 29))
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    lr, idx = valley(lrs, losses)
    # longest strictly decreasing run starts at index 19 (last 3.0) and ends at 70
    assert idx == 19 + int(51 / 3) + int(51 / 3 / 2)
    assert lr == lrs[idx]
    # the lr_find suggestion trims the first tenth and the last five points first
    assert suggest_valley(lrs, losses, 100) == pytest.approx(valley(lrs[10:-5], losses[10:-5])[0])


def test_suggestion_stops_at_nan_and_needs_points():
    losses = [3.0, 2.5, 2.0, 1.5, 1.0, float("nan"), 0.5] + [0.4] * 10
    lrs = [float(i + 1) for i in range(len(losses))]
    assert suggest_valley(lrs, losses, 10) <= 5.0
    with pytest.raises(ValueError, match="too few points"):
        suggest_valley([1.0] * 6, [1.0] * 6, 10)


def test_smooth_loss_on_a_tensor_is_the_float_average_bit_for_bit():
    """The training loop keeps the running loss on the device (no sync per step): float64
    tensor updates give exactly the Python floats' values."""
    from cassava_pipeline.vision.schedule import SmoothLoss

    losses = torch.rand(300, generator=torch.Generator().manual_seed(3), dtype=torch.float32) * 3
    on_floats, on_tensors = SmoothLoss(), SmoothLoss()
    assert math.isnan(on_tensors.value)
    for v in losses:
        a = on_floats.update(float(v))
        b = on_tensors.update(v.double())
        assert isinstance(b, torch.Tensor) and float(b) == a
    assert on_tensors.value == on_floats.value == a
