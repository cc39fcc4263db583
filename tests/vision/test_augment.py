"""Batch augmentation: identity at p=0, exact flips, one resample, per-sample draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cassava_pipeline.vision.augment import AugmentOptions, BatchAugment

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def batch(n: int = 4, s: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)


NOTHING = dict(p_flip=0.0, p_affine=0.0, p_lighting=0.0, min_scale=1.0)


def test_all_probabilities_zero_is_identity():
    x = batch()
    aug = BatchAugment(AugmentOptions(size=16, **NOTHING), MEAN, STD)
    out = aug(x, train=True, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x.float() / 255, atol=1e-5)


def test_flip_alone_is_exact():
    x = batch()
    opts = AugmentOptions(
        size=16, p_flip=1.0, max_rotate=0, max_zoom=1.0, max_warp=0, max_lighting=0, min_scale=1.0
    )
    out = BatchAugment(opts, MEAN, STD)(x, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x.float().flip(-1) / 255, atol=1e-5)


def test_geometry_is_resampled_once(monkeypatch):
    calls = []
    real = F.grid_sample

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, "grid_sample", counting)
    aug = BatchAugment(AugmentOptions(size=8, min_scale=0.75, resample="once"), MEAN, STD)
    out = aug(batch(s=20), train=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 8, 8) and len(calls) == 1
    aug(batch(s=20), train=False)
    assert len(calls) == 2


def test_each_sample_draws_its_own_parameters():
    x = batch(n=1).repeat(6, 1, 1, 1)
    out = BatchAugment(AugmentOptions(size=16, min_scale=0.75), MEAN, STD)(
        x, train=True, generator=torch.Generator().manual_seed(3)
    )
    distinct = {tuple(o.flatten()[:50].tolist()) for o in out}
    assert len(distinct) == 6


def test_seeded_generator_reproduces_the_batch():
    aug = BatchAugment(AugmentOptions(size=12, min_scale=0.75), (0.5,) * 3, (0.5,) * 3)
    a = aug(batch(), train=True, generator=torch.Generator().manual_seed(5))
    b = aug(batch(), train=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_validation_only_resizes_and_normalises():
    x = torch.full((2, 3, 20, 20), 51, dtype=torch.uint8)
    out = BatchAugment(AugmentOptions(size=10), (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))(x, train=False)
    expect = (torch.tensor([0.2, 0.2, 0.2]) - torch.tensor([0.1, 0.2, 0.3])) / 0.5
    assert out.shape == (2, 3, 10, 10)
    assert torch.allclose(out[0, :, 3, 3], expect, atol=1e-5)
    ident = BatchAugment(AugmentOptions(size=16), MEAN, STD)(batch(), train=False)
    assert torch.allclose(ident, batch().float() / 255, atol=1e-5)


def test_lighting_only_changes_intensity_not_geometry():
    x = torch.full((8, 3, 8, 8), 128, dtype=torch.uint8)
    opts = AugmentOptions(size=8, p_flip=0.0, p_affine=0.0, p_lighting=1.0, min_scale=1.0)
    out = BatchAugment(opts, MEAN, STD)(x, train=True, generator=torch.Generator().manual_seed(0))
    per_image = out.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image))  # still flat images
    assert per_image[:, 0].std() > 0.01  # but of different brightness
    # fastai's lighting with max_lighting 0.2, in logit space: brightness adds the logit of a
    # value drawn in (0.4, 0.6) to the pixel's (128/255), then contrast scales the sum by a
    # factor in [0.8, 1.25]: every image ends between these two bounds.
    assert opts.max_lighting == 0.2
    grey = torch.logit(torch.tensor(128 / 255))
    lo = torch.sigmoid((grey + torch.logit(torch.tensor(0.4))) * 1.25)
    hi = torch.sigmoid((grey + torch.logit(torch.tensor(0.6))) * 1.25)
    assert ((per_image[:, 0] >= lo - 1e-6) & (per_image[:, 0] <= hi + 1e-6)).all()


def test_random_resized_crop_is_drawn_per_batch_as_fastai_or_per_image():
    """fastai's RandomResizedCropGPU draws one crop for the whole batch (the default here);
    ``crop: sample`` draws one per image."""
    from cassava_pipeline.vision.augment import affine_matrices

    still = dict(do_flip=False, max_rotate=0.0, max_zoom=1.0, max_warp=0.0, min_scale=0.5)
    g = torch.Generator().manual_seed(0)
    batch = affine_matrices(6, AugmentOptions(size=8, **still), g, "cpu")
    assert torch.equal(batch, batch[:1].expand_as(batch))  # one crop for every image
    assert not torch.equal(batch[0], torch.eye(3))  # and a real one
    per_image = affine_matrices(6, AugmentOptions(size=8, crop="sample", **still), g, "cpu")
    assert len({tuple(m.flatten().tolist()) for m in per_image}) == 6
    with pytest.raises(ValueError, match=r"augment\.crop"):
        affine_matrices(2, AugmentOptions(size=8, crop="image", **still), g, "cpu")


def test_sampling_grid_is_the_affine_grid_then_fastais_warp():
    """The one-pass grid equals ``F.affine_grid`` followed by the perspective warp applied to
    its coordinates with a batched matmul (fastai's ``apply_perspective``), for both corner
    conventions and non-square inputs."""

    from cassava_pipeline.vision.augment import (
        affine_matrices,
        sampling_grid,
        warp_homographies,
    )

    for seed in range(4):
        for align in (True, False):
            opts = AugmentOptions(size=24, min_scale=0.75, align_corners=align)
            g = torch.Generator().manual_seed(seed)
            mats = affine_matrices(5, opts, g, "cpu")
            warp = warp_homographies(5, opts, g, "cpu")
            affine = F.affine_grid(mats[:, :2], [5, 3, 24, 24], align_corners=align)
            pts = torch.cat([affine.reshape(5, -1, 2), torch.ones(5, 24 * 24, 1)], -1)
            out = pts @ warp.transpose(1, 2)
            reference = (out[..., :2] / out[..., 2:]).view(5, 24, 24, 2)
            assert torch.allclose(sampling_grid(mats, 24, align, warp), reference, atol=2e-6)
            assert torch.allclose(sampling_grid(mats, 24, align), affine, atol=2e-6)
            assert not torch.equal(reference, affine)  # the warp moved the points


def test_sampling_grid_is_bit_for_bit_the_plain_expression():
    """Writing each coordinate in place into the grid changes no bit against the plain
    expression (the homography's rows over the pixel coordinates, divided, then stacked): the
    same runs give the same weights as before the rewrite."""
    from cassava_pipeline.vision.augment import (
        affine_matrices,
        sampling_grid,
        warp_homographies,
    )

    def plain(mats: torch.Tensor, size: int, align: bool, warp) -> torch.Tensor:
        n = mats.shape[0]
        lin = torch.linspace(-1.0, 1.0, size)
        if not align:
            lin = lin * (size - 1) / size
        xs, ys = lin.view(1, 1, size), lin.view(1, size, 1)
        r = (mats if warp is None else warp @ mats).reshape(n, 9, 1, 1)
        x, y, w = (r[:, i] * xs + r[:, i + 1] * ys + r[:, i + 2] for i in (0, 3, 6))
        return torch.stack([x, y] if warp is None else [x / w, y / w], -1)

    for seed in range(6):
        for size, align in ((24, True), (31, False), (128, True)):
            opts = AugmentOptions(size=size, min_scale=0.75, max_warp=0.4, align_corners=align)
            g = torch.Generator().manual_seed(seed)
            mats = affine_matrices(7, opts, g, "cpu")
            warp = warp_homographies(7, opts, g, "cpu")
            expect = plain(mats, size, align, warp)
            assert torch.equal(sampling_grid(mats, size, align, warp), expect)
            # the GPU's path (no host sync: the fallback chosen on the device) gives the same bits
            assert torch.equal(sampling_grid(mats, size, align, warp, sync_free=True), expect)
            assert torch.equal(sampling_grid(mats, size, align), plain(mats, size, align, None))


def test_sampling_grid_keeps_the_unwarped_grid_where_a_denominator_is_zero():
    """fastai's apply_perspective returns the unwarped coordinates when any denominator is 0;
    here one image's warp has w = x, which is 0 on the middle column of an odd grid."""
    from cassava_pipeline.vision.augment import sampling_grid

    mats = torch.eye(3).expand(2, 3, 3).clone()
    mats[1, 0, 0] = 0.5  # a zoom, so the two images' grids differ
    warp = torch.eye(3).expand(2, 3, 3).clone()
    warp[0, 2] = torch.tensor([1.0, 0.0, 0.0])  # w = x
    affine = F.affine_grid(mats[:, :2], [2, 3, 5, 5], align_corners=True)
    assert torch.allclose(sampling_grid(mats, 5, True, warp), affine, atol=1e-7)
    fallback = sampling_grid(mats, 5, True, warp, sync_free=True)  # decided on the device
    assert torch.equal(fallback, sampling_grid(mats, 5, True, warp))
    warp[0, 2] = torch.tensor([0.25, 0.0, 1.0])  # w = 1 + x/4: never 0, so the warp applies
    assert not torch.allclose(sampling_grid(mats, 5, True, warp), affine, atol=1e-3)


TWICE = dict(size=16, min_scale=0.75, resample="twice")


def test_twice_resamples_at_the_input_size_then_crops_and_resizes(monkeypatch):
    """``resample: twice`` is fastai's path: one grid_sample at the input's own size (affine and
    warp), a second from a whole-pixel crop to ``size``; validation resizes once."""
    shapes = []
    real = F.grid_sample

    def recording(x, grid, **k):
        shapes.append((tuple(x.shape[-2:]), tuple(grid.shape[1:3])))
        return real(x, grid, **k)

    monkeypatch.setattr(F, "grid_sample", recording)
    aug = BatchAugment(AugmentOptions(**TWICE), MEAN, STD)
    out = aug(batch(s=20), train=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16)
    (first_in, first_out), (crop, second_out) = shapes
    assert first_in == first_out == (20, 20) and second_out == (16, 16)
    assert crop[0] == crop[1] and 18 <= crop[0] <= 20  # round(sqrt([0.75, 1] * 400))
    shapes.clear()
    aug(batch(s=20), train=False)
    assert shapes == [((20, 20), (16, 16))]


def test_twice_with_only_the_crop_is_a_pixel_crop_bilinearly_resized():
    """Every other augmentation off: the output is the crop's pixels resized as fastai's
    ``affine_coord(sz=size)`` does (bilinear, ``align_corners=True``), the crop a square of
    whole pixels inside the image."""
    from cassava_pipeline.vision.augment import crop_boxes

    still = dict(do_flip=False, max_rotate=0.0, max_zoom=1.0, max_warp=0.0, max_lighting=0.0)
    opts = AugmentOptions(**TWICE, **still)
    x = batch(s=20)
    out = BatchAugment(opts, MEAN, STD)(x, train=True, generator=torch.Generator().manual_seed(4))
    # the same draws: nothing else draws from the generator before the crop
    ((top, left, h, w),) = crop_boxes(1, 20, 20, opts, torch.Generator().manual_seed(4), "cpu")
    want = F.interpolate(
        x[..., top : top + h, left : left + w].float() / 255,
        size=(16, 16),
        mode="bilinear",
        align_corners=True,
    )
    assert torch.allclose(out, want, atol=1e-5)


def test_crop_boxes_cover_every_position_and_size_fastai_draws():
    """Sides are ``round(sqrt(u * h * w))`` for u in [min_scale, 1]; top-left corners take every
    value from 0 to ``side_max - side`` inclusive; a non-square input gets fastai's fallback, the
    centred square of its shorter side, when no square of the drawn area fits."""
    from cassava_pipeline.vision.augment import crop_boxes

    g = torch.Generator().manual_seed(0)
    boxes = crop_boxes(4000, 12, 12, AugmentOptions(min_scale=0.5), g, "cpu")
    sides = {b[2] for b in boxes}
    assert sides == set(range(8, 13))  # round(sqrt(72)) = 8 up to 12
    for side in sides:
        tops = {t for t, _, s, _ in boxes if s == side}
        lefts = {left for _, left, s, _ in boxes if s == side}
        assert tops == lefts == set(range(13 - side))
    assert all(w == h for _, _, h, w in boxes)
    tall = crop_boxes(50, 30, 10, AugmentOptions(min_scale=0.75), g, "cpu")
    assert set(tall) == {(10, 0, 10, 10)}  # sqrt(0.75 * 300) = 15 > 10: never fits


def test_fastai_grid_sample_area_downsamples_before_a_large_shrink():
    """fastai's ``_grid_sample``: a resize to less than half the input first averages areas
    (its smoother downsampling), then samples; a smaller shrink samples directly."""
    from cassava_pipeline.vision.augment import resize

    opts = AugmentOptions(size=16)
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = 40 / 16 / 2  # 1.25 > 1: area first, to floor(40 / 1.25) = 32
    area = F.interpolate(x, scale_factor=1 / d, mode="area", recompute_scale_factor=True)
    assert area.shape[-1] == 32
    want = F.interpolate(area, size=(16, 16), mode="bilinear", align_corners=True)
    assert torch.allclose(resize(x, opts), want, atol=1e-12)
    small = x[..., :30, :30]  # 30 / 16 / 2 < 1: straight to 16
    want = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=True)
    assert torch.allclose(resize(small, opts), want, atol=1e-12)


def test_twice_equals_once_without_a_crop_and_checks_its_value():
    """With ``min_scale: 1`` fastai resamples once (aug_transforms passes the size to the affine
    transforms), so ``twice`` is ``once`` to the bit; an unknown value is named."""
    x = batch(s=20)
    outs = [
        BatchAugment(AugmentOptions(size=16, min_scale=1.0, resample=r), MEAN, STD)(
            x, train=True, generator=torch.Generator().manual_seed(2)
        )
        for r in ("once", "twice")
    ]
    assert torch.equal(*outs)
    with pytest.raises(ValueError, match=r"augment\.resample"):
        BatchAugment(AugmentOptions(size=16, resample="thrice"), MEAN, STD)(x, train=False)


def test_twice_validation_centres_a_non_square_input():
    """fastai's validation crop (``valid_scale=1``, ``ratio=(1, 1)``): the centred square of the
    shorter side, resized."""
    x = torch.zeros(1, 3, 20, 30, dtype=torch.uint8)
    x[..., 5:25] = 200  # the centred 20x20 square
    out = BatchAugment(AugmentOptions(**TWICE), MEAN, STD)(x, train=False)
    assert torch.allclose(out, torch.full_like(out, 200 / 255), atol=1e-6)


def test_a_gpu_generator_draws_the_crop_on_the_host_without_reading_the_device():
    """On a CUDA generator the crop comes from a CPU generator seeded from its seed and Philox
    offset (host-side numbers): the same state gives the same crop, another offset another; a
    CPU generator is used as it is, so CPU runs draw exactly what they drew before."""
    from cassava_pipeline.vision.augment import crop_boxes, host_generator

    class CudaLike:  # the host-side part of a CUDA generator's interface
        def __init__(self, seed, offset):
            self.device, self.seed, self.offset = torch.device("cuda"), seed, offset

        def initial_seed(self):
            return self.seed

        def get_offset(self):
            return self.offset

    opts = AugmentOptions(min_scale=0.5)

    def boxes(g):
        hg = host_generator(g)
        assert hg.device.type == "cpu"
        return crop_boxes(8, 40, 40, opts, hg, "cpu")

    assert boxes(CudaLike(3, 96)) == boxes(CudaLike(3, 96))
    assert boxes(CudaLike(3, 96)) != boxes(CudaLike(3, 100))
    assert boxes(CudaLike(3, 96)) != boxes(CudaLike(4, 96))
    cpu = torch.Generator().manual_seed(0)
    assert host_generator(cpu) is cpu and host_generator(None) is None


def test_a_non_square_input_draws_the_area_again_until_its_square_fits():
    """fastai's ten tries: on a 30x50 input an area of sqrt(u * 1500) > 30 px is drawn again,
    so most crops are random squares below 30 px, not the centred fallback."""
    from cassava_pipeline.vision.augment import crop_boxes

    g = torch.Generator().manual_seed(0)
    boxes = crop_boxes(500, 30, 50, AugmentOptions(min_scale=0.3), g, "cpu")
    fallback = [b for b in boxes if b == (0, 10, 30, 30)]
    assert all(side <= 30 for *_, side in boxes)
    # one draw fits when u <= 930.25 / 1500 = 0.62: p = 0.46; ten misses: 0.54^10 = 0.2%
    assert len(fallback) < 15 and len({b[2] for b in boxes}) >= 10
