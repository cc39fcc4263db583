"""fastai's ``aug_transforms`` on the training device, resampled as fastai resamples.

fastai composes flip, rotate and zoom into one affine matrix, adds the perspective warp to the
sampling grid and makes one ``grid_sample`` call at the presize resolution; its
``RandomResizedCropGPU`` (``min_scale < 1``) then crops whole pixels and resamples a second time.
``resample: twice`` (the default) is that path, step for step: the affine and warp at the input's
own size with reflection padding, then an integer square crop (drawn as ``RandomResizedCropGPU``
draws it with ``ratio=(1, 1)``) resized to the final size, through fastai's ``_grid_sample``
(which area-downsamples first when the resize shrinks by more than 2x). ``resample: once``
composes the crop into the affine matrix instead, so every image is resampled exactly once, from
the presized square straight to the final size: less arithmetic and sharper images. On clothing-
small, ten paired seeds, ``twice`` alone did not move accuracy (-0.002), and ``once`` with the
half-scale JPEG decode (the old defaults) scored 0.007 under ``twice`` with the full decode (p =
0.14; benchmarks/RESULTS.md, "The pixel differences A/B, ten seeds each").
On a GPU the crop is drawn on the host (:func:`host_generator`), so nothing waits for the GPU.

Each sample draws its own parameters (fastai's ``batch=False``), with fastai's distributions:

- flip: probability 0.5;
- warp: with ``p_affine``, x and y magnitudes uniform in [-max_warp, max_warp] (perspective);
- rotate: with ``p_affine``, uniform in [-max_rotate, max_rotate] degrees;
- zoom: with ``p_affine``, scale uniform in [min_zoom, max_zoom] about a uniform centre;
- random resized crop: square, area fraction uniform in [min_scale, 1], uniform position; one
  crop for the whole batch by default, as fastai's ``RandomResizedCropGPU`` draws it
  (``crop: sample`` draws one per image instead);
- brightness: with ``p_lighting``, uniform in 0.5 * (1 -/+ max_lighting), added in logit space;
- contrast: with ``p_lighting``, log-uniform in [1 - max_lighting, 1 / (1 - max_lighting)],
  multiplying the logits.

Padding is reflection and ``align_corners=True``, as fastai. Validation batches are only resized
(fastai's validation path: the same bilinear ``grid_sample`` with an identity matrix, after its
area downsampling when the resize shrinks by more than 2x, as Kaggle's 460 to 224 does).
Normalisation comes last.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Gt, Le

from .options import (
    STRICT,
    Fraction,
    NonNegativeFloat,
    OpenFraction,
    OptionError,
    PositiveFloat,
    Side,
    check_choices,
)


@dataclass(frozen=True)
class AugmentOptions:
    """fastai's ``aug_transforms`` arguments, with its defaults."""

    __pydantic_config__ = STRICT

    # output side (square); a training stage sets it from its own ``size`` (StageConfig)
    size: Side | None = None
    min_scale: Annotated[float, Gt(0.0), Le(1.0)] = 1.0  # fastai's; the seeds use 0.75
    crop: Literal["batch", "sample"] = "batch"  # fastai's RandomResizedCropGPU: one per batch
    resample: Literal["once", "twice"] = "twice"  # fastai's: affine, then crop + resize
    do_flip: bool = True
    max_rotate: NonNegativeFloat = 10.0  # degrees
    min_zoom: PositiveFloat = 1.0
    max_zoom: PositiveFloat = 1.1
    max_warp: OpenFraction = 0.2
    p_affine: Fraction = 0.75
    max_lighting: OpenFraction = 0.2
    p_lighting: Fraction = 0.75
    p_flip: Fraction = 0.5  # fastai's Flip(p=0.5)
    mult: NonNegativeFloat = 1.0  # scales max_rotate, max_lighting and max_warp
    pad_mode: Literal["reflection", "zeros", "border"] = "reflection"
    align_corners: bool = True

    def __post_init__(self) -> None:
        check_choices(self, "augment")
        if self.max_zoom < self.min_zoom:
            raise OptionError(
                "max_zoom",
                self.max_zoom,
                f"max_zoom ({self.max_zoom}) is below min_zoom ({self.min_zoom})",
                "augment",
            )


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _mask(values: torch.Tensor, p: float, neutral: float, g, device) -> torch.Tensor:
    """fastai's mask_tensor: each value kept with probability p, else ``neutral``."""
    if p >= 1.0:
        return values
    keep = torch.rand(values.shape[0], generator=g, device=device) < p
    return torch.where(keep, values, torch.full_like(values, neutral))


def _affine(a, b, c, d, e, f) -> torch.Tensor:
    """Stack per-sample rows into (n, 3, 3) matrices [[a, b, c], [d, e, f], [0, 0, 1]]."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack(
        [torch.stack([a, b, c], 1), torch.stack([d, e, f], 1), torch.stack([zero, zero, one], 1)], 1
    )


def affine_matrices(n: int, opts: AugmentOptions, g, device) -> torch.Tensor:
    """Per-sample (n, 3, 3) matrix: flip @ rotate @ zoom @ crop, in normalised coordinates.

    Maps output coordinates to input coordinates, as ``F.affine_grid`` expects.
    """
    eye = torch.eye(3, device=device).expand(n, 3, 3)
    mats = eye
    zeros = torch.zeros(n, device=device)
    if opts.do_flip:
        flip = _mask(-torch.ones(n, device=device), opts.p_flip, 1.0, g, device)
        mats = mats @ _affine(flip, zeros, zeros, zeros, torch.ones_like(flip), zeros)
    max_rotate = opts.max_rotate * opts.mult
    if max_rotate:
        deg = _mask(_uniform(n, -max_rotate, max_rotate, g, device), opts.p_affine, 0.0, g, device)
        t = deg * math.pi / 180
        mats = mats @ _affine(t.cos(), t.sin(), zeros, -t.sin(), t.cos(), zeros)
    if opts.min_zoom < 1 or opts.max_zoom > 1:
        scale = _mask(
            _uniform(n, opts.min_zoom, opts.max_zoom, g, device), opts.p_affine, 1.0, g, device
        )
        s = 1 / scale
        col = _uniform(n, 0, 1, g, device)
        row = _uniform(n, 0, 1, g, device)
        mats = mats @ _affine(s, zeros, (1 - s) * (2 * col - 1), zeros, s, (1 - s) * (2 * row - 1))
    if opts.min_scale < 1:
        # Square random resized crop: side fraction sqrt(area), uniform top-left corner; drawn
        # once for the batch (fastai's RandomResizedCropGPU) or once per image.
        k = 1 if opts.crop == "batch" else n
        side = _uniform(k, opts.min_scale, 1.0, g, device).sqrt()
        cx = (1 - side) * (2 * _uniform(k, 0, 1, g, device) - 1)
        cy = (1 - side) * (2 * _uniform(k, 0, 1, g, device) - 1)
        side, cx, cy = side.expand(n), cx.expand(n), cy.expand(n)
        mats = mats @ _affine(side, zeros, cx, zeros, side, cy)
    return mats


def _perspective_coeffs(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """fastai's find_coeffs: the 8 homography coefficients mapping ``dst`` points to ``src``."""
    rows = []
    for i in range(src.shape[1]):
        x, y = dst[:, i, 0], dst[:, i, 1]
        u, v = src[:, i, 0], src[:, i, 1]
        one, zero = torch.ones_like(x), torch.zeros_like(x)
        rows.append(torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], 1))
        rows.append(torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], 1))
    a = torch.stack(rows, 1)
    b = src.reshape(src.shape[0], 8, 1)
    # solve_ex: linalg.solve's kernel without its singularity check, which on a GPU waits for
    # the result to reach the CPU. fastai's corner moves (|x|, |y| <= max_warp) never make the
    # system singular.
    return torch.linalg.solve_ex(a, b)[0][..., 0]


@functools.cache
def _corners(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The four corners of normalised coordinates, copied to ``device`` once (a copy from the
    CPU each batch would make the CPU wait for the GPU)."""
    return torch.tensor([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=dtype, device=device)


def warp_homographies(n: int, opts: AugmentOptions, g, device) -> torch.Tensor:
    """fastai's random perspective warp: (n, 3, 3) homographies of normalised coordinates,
    the corners moved by x and y magnitudes drawn as fastai draws them."""
    mag = opts.max_warp * opts.mult
    xt = _mask(_uniform(n, -mag, mag, g, device), opts.p_affine, 0.0, g, device)
    yt = _mask(_uniform(n, -mag, mag, g, device), opts.p_affine, 0.0, g, device)
    orig = _corners(xt.dtype, xt.device).unsqueeze(0).expand(n, 4, 2)
    targ = torch.stack(
        [
            torch.stack([-1 - yt, -1 - xt], 1),
            torch.stack([-1 + yt, 1 + xt], 1),
            torch.stack([1 + yt, -1 + xt], 1),
            torch.stack([1 - yt, 1 - xt], 1),
        ],
        1,
    )
    coeffs = _perspective_coeffs(orig, targ)
    return torch.cat([coeffs, torch.ones(n, 1, dtype=xt.dtype, device=device)], 1).view(n, 3, 3)


def sampling_grid(
    mats: torch.Tensor,
    size: int | tuple[int, int],
    align_corners: bool,
    warp: torch.Tensor | None = None,
    *,
    sync_free: bool | None = None,
) -> torch.Tensor:
    """The (n, size, size, 2) grid ``grid_sample`` reads: ``F.affine_grid(mats[:, :2])``, then
    fastai's perspective ``warp`` of those coordinates, as one homography per image applied
    to the output pixels' coordinates in a single elementwise pass (fastai builds the affine
    grid, then warps it with a batched matmul: the same map, 5 ms less per batch of 32 at 128).
    Where a warp's denominator is 0 somewhere, fastai keeps the unwarped grid; so does this.
    Each coordinate is computed in place and written straight into the grid (no stacking copy):
    the same values, bit for bit, in half the time. ``sync_free`` (default: off the CPU) decides
    the fallback on the device instead of in Python (no wait for the GPU; both maps computed)."""
    n = mats.shape[0]
    h, w = (size, size) if isinstance(size, int) else size

    def axis(k: int) -> torch.Tensor:
        lin = torch.linspace(-1.0, 1.0, k, dtype=mats.dtype, device=mats.device)
        return lin if align_corners else lin * (k - 1) / k  # affine_grid's pixel centres

    xs, ys = axis(w).view(1, 1, w), axis(h).view(1, h, 1)

    def row(r: torch.Tensor, i: int) -> torch.Tensor:  # row i's map, (n, size, size)
        return (r[:, i] * xs + r[:, i + 1] * ys).add_(r[:, i + 2])

    grid = torch.empty(n, h, w, 2, dtype=mats.dtype, device=mats.device)
    if warp is not None:
        r = (warp @ mats).reshape(n, 9, 1, 1)
        w = row(r, 6)
        zero = (w == 0).any()
        if mats.device.type != "cpu" if sync_free is None else sync_free:
            # Asking the GPU whether any denominator is 0 would stall the CPU until the GPU has
            # caught up: compute both maps and let the device pick (the same values).
            plain = mats.reshape(n, 9, 1, 1)
            for i, k in ((0, 0), (1, 3)):
                torch.where(zero, row(plain, k), row(r, k) / w, out=grid[..., i])
            return grid
        if not zero:
            torch.div(row(r, 0), w, out=grid[..., 0])
            torch.div(row(r, 3), w, out=grid[..., 1])
            return grid
    r = mats.reshape(n, 9, 1, 1)
    grid[..., 0] = row(r, 0)
    grid[..., 1] = row(r, 3)
    return grid


def crop_boxes(
    k: int, h: int, w: int, opts: AugmentOptions, g, device
) -> list[tuple[int, int, int, int]]:
    """fastai's ``RandomResizedCropGPU(size, min_scale, ratio=(1, 1))`` crops: ``k`` (top, left,
    height, width) boxes of whole pixels, the area fraction uniform in [min_scale, 1], the side
    ``round(sqrt(area))``, the corner uniform over the positions that fit; an area whose square
    does not fit (a non-square input) is drawn again, 10 tries in all as fastai, then the
    centred square of the shorter side."""
    fractions = _uniform(k, opts.min_scale, 1.0, g, device).tolist()
    corners = _uniform(2 * k, 0.0, 1.0, g, device).tolist()
    boxes = []
    for i, frac in enumerate(fractions):
        side = round(math.sqrt(frac * w * h))  # Python's round, as fastai's
        for _ in range(9):  # only a non-square input draws again
            if side <= min(h, w):
                break
            side = round(math.sqrt(_uniform(1, opts.min_scale, 1.0, g, device).item() * w * h))
        if side <= min(h, w):
            top = min(int(corners[2 * i] * (h - side + 1)), h - side)
            left = min(int(corners[2 * i + 1] * (w - side + 1)), w - side)
            boxes.append((top, left, side, side))
        else:  # fastai's fallback: the centred square of the shorter side
            side = min(h, w)
            boxes.append(((h - side) // 2, (w - side) // 2, side, side))
    return boxes


def host_generator(g: torch.Generator | None) -> torch.Generator | None:
    """The generator the crop is drawn with: its sizes must reach the host (they slice the
    batch), and reading numbers drawn on a GPU makes the CPU wait for it. For a CUDA generator,
    a CPU generator seeded from its seed and Philox offset, both kept on the host (so nothing
    waits), both restored with its state on resume, and the offset moves with every draw made
    on the device. A CPU generator (or none) is used as it is."""
    if g is None or g.device.type == "cpu":
        return g
    try:
        offset = g.get_offset()
    except RuntimeError:  # a device without a host-side offset: draw there (and wait)
        return g
    return torch.Generator().manual_seed((g.initial_seed() * 1_000_003 + offset) % 2**63)


def fastai_grid_sample(
    x: torch.Tensor, grid: torch.Tensor, opts: AugmentOptions, zoom: float | None = None
) -> torch.Tensor:
    """fastai's ``_grid_sample``: bilinear ``grid_sample``, after an area downsampling of the
    input when the output shrinks it by more than 2x and the grid zooms in by less (its "hack
    to get smoother downwards resampling"). ``zoom``: the grid's zoom, 2 / its extent, where the
    caller knows it; else it is read from the grid (on a GPU that waits for the grid)."""
    d = min(x.shape[-2] / grid.shape[-3], x.shape[-1] / grid.shape[-2]) / 2
    if d > 1:
        if zoom is None:
            lo, hi = torch.aminmax(grid)
            zoom = 2 / (hi - lo).item()
        if d > zoom:
            x = F.interpolate(x, scale_factor=1 / d, mode="area", recompute_scale_factor=True)
    return F.grid_sample(
        x, grid, mode="bilinear", padding_mode=opts.pad_mode, align_corners=opts.align_corners
    )


def resize(x: torch.Tensor, opts: AugmentOptions) -> torch.Tensor:
    """fastai's ``affine_coord(sz=size)`` with no matrix (its validation resize): the identity
    grid, through :func:`fastai_grid_sample`. The identity grid's extent is known: [-1, 1], or
    (k - 1) / k of it at pixel centres (``align_corners=False``), so nothing waits for it."""
    eye = torch.eye(3, dtype=x.dtype, device=x.device).expand(x.shape[0], 3, 3)
    k = opts.size
    zoom = 1.0 if opts.align_corners else k / (k - 1)
    return fastai_grid_sample(x, sampling_grid(eye, k, opts.align_corners), opts, zoom)


def _logit(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(1e-7, 1 - 1e-7)
    return -(1 / x - 1).log()


def lighting(x: torch.Tensor, opts: AugmentOptions, g, device) -> torch.Tensor:
    """fastai's Brightness then Contrast, composed in logit space."""
    n = x.shape[0]
    ml = opts.max_lighting * opts.mult
    bright = _mask(
        _uniform(n, 0.5 * (1 - ml), 0.5 * (1 + ml), g, device), opts.p_lighting, 0.5, g, device
    )
    contrast = _mask(
        _uniform(n, math.log(1 - ml), -math.log(1 - ml), g, device).exp(),
        opts.p_lighting,
        1.0,
        g,
        device,
    )
    # fastai's logit (clamped to [1e-7, 1 - 1e-7]) as one kernel, the rest in place
    z = torch.logit(x, eps=1e-7).add_(_logit(bright)[:, None, None, None])
    return z.mul_(contrast[:, None, None, None]).sigmoid_()


class BatchAugment:
    """Callable turning a uint8 (n, 3, s, s) batch into a normalised float (n, 3, size, size) one.

    ``train=True`` applies the random augmentations; ``train=False`` only resizes. A
    ``torch.Generator`` (on the batch's device) makes the draws reproducible.
    """

    def __init__(
        self,
        opts: AugmentOptions,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ):
        if opts.size is None:
            raise ValueError("augment.size is not set: the output side (a stage sets its size)")
        self.opts = opts
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self._on: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per device and dtype

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std on ``x``'s device, copied there once (not once per batch)."""
        key = (x.device, x.dtype)
        if key not in self._on:
            self._on[key] = (self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype))
        return self._on[key]

    def geometry(self, x: torch.Tensor, train: bool, g: torch.Generator | None) -> torch.Tensor:
        """Resample float images once through the composed grid (or as fastai does, twice)."""
        o = self.opts
        if o.resample == "twice" and o.min_scale < 1:
            return self._two_steps(x, train, g)
        if not train:  # fastai's validation: the identity grid (area-shrunk first past 2x)
            return resize(x, o)
        grid = self._affine_grid(x, o, o.size, g)
        return F.grid_sample(
            x, grid, mode="bilinear", padding_mode=o.pad_mode, align_corners=o.align_corners
        )

    @staticmethod
    def _affine_grid(x: torch.Tensor, o: AugmentOptions, size, g) -> torch.Tensor:
        """Draw the per-sample affine matrices (with ``o``'s crop, if any) and the warp, and
        build the ``size`` sampling grid of them over ``x``."""
        n, _, h, w = x.shape
        mats = affine_matrices(n, o, g, x.device).clone()
        mats[:, 0, 1] *= h / w  # fastai's _prepare_mat, for non-square inputs
        mats[:, 1, 0] *= w / h
        warp = warp_homographies(n, o, g, x.device) if o.max_warp * o.mult else None
        return sampling_grid(mats.to(x.dtype), size, o.align_corners, warp)

    def _two_steps(self, x: torch.Tensor, train: bool, g: torch.Generator | None) -> torch.Tensor:
        """fastai's path with ``min_scale < 1``: flip, rotate, zoom and warp resampled at the
        input's own size, then ``RandomResizedCropGPU``'s whole-pixel crop resized to ``size``.
        Validation: the whole image resized (``valid_scale=1``; fastai's identity resample at
        the input's size before it moves no pixel by more than float rounding, so it is skipped)."""
        o = self.opts
        n, _, h, w = x.shape
        if not train:  # fastai's valid crop: the centred square of the shorter side
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            return resize(x[..., top : top + side, left : left + side], o)
        # the affine and the warp at the input's own size, without the crop (drawn below)
        x = fastai_grid_sample(x, self._affine_grid(x, replace(o, min_scale=1.0), (h, w), g), o)
        hg = host_generator(g)
        on = x.device if hg is not None and hg.device.type != "cpu" else "cpu"
        boxes = crop_boxes(1 if o.crop == "batch" else n, h, w, o, hg, on)
        if len(boxes) == 1:
            top, left, bh, bw = boxes[0]
            return resize(x[..., top : top + bh, left : left + bw], o)
        crops = [x[i : i + 1, :, t : t + bh, c : c + bw] for i, (t, c, bh, bw) in enumerate(boxes)]
        return torch.cat([resize(crop, o) for crop in crops])

    def __call__(
        self, images: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = images.float().div_(255)
        x = self.geometry(x, train, generator)
        if train and self.opts.max_lighting * self.opts.mult:
            x = lighting(x, self.opts, generator, x.device)
        mean, std = self._stats(x)
        return x.sub_(mean).div_(std)  # x is this call's own tensor (grid_sample's output)
