"""A deterministic, procedurally drawn stand-in for the Kaggle Cassava data set.

Each image shows a few palmate cassava leaves (5 to 7 lance-shaped leaflets) over soil, grass or
litter, with the symptoms that tell the five classes apart on real photos:

- CBB, bacterial blight: angular brown lesions with yellow halos, blighted leaflet tips;
- CBSD, brown streak: yellow feathery blotches along the secondary veins, brown streaks;
- CGM, green mottle: many small pale-green to whitish spots, a faded look;
- CMD, mosaic: yellow-green mosaic patches, narrow, curled and distorted leaflets;
- Healthy: clean green leaves (with the odd speck of dirt).

Severity varies, some leaves of a diseased plant look healthy, and every image gets random
lighting, rotation, scale, blur and noise, so the classes are learnable but not
trivially separable. Class frequencies follow the real competition (CMD about 61%).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from .options import STRICT, NonNegativeInt, PositiveFloat, PositiveInt, Side
from .parallel import ordered_map, resolve_workers

# Kaggle's label_num_to_disease_map.json, verbatim.
CASSAVA_CLASSES = (
    "Cassava Bacterial Blight (CBB)",
    "Cassava Brown Streak Disease (CBSD)",
    "Cassava Green Mottle (CGM)",
    "Cassava Mosaic Disease (CMD)",
    "Healthy",
)
# Share of each class in Kaggle's train.csv (1087, 2189, 2386, 13158, 2577 of 21,397).
KAGGLE_CLASS_FRACTIONS = (0.0508, 0.1023, 0.1115, 0.6149, 0.1205)

CBB, CBSD, CGM, CMD, HEALTHY = range(5)


@dataclass(frozen=True)
class SampleOptions:
    """What to generate."""

    __pydantic_config__ = STRICT

    n_images: PositiveInt = 400
    width: Side = 800  # Kaggle's images are 800x600
    height: Side = 600
    seed: int = 2020
    class_fractions: tuple[PositiveFloat, ...] = KAGGLE_CLASS_FRACTIONS
    n_test_images: NonNegativeInt = 0  # unlabeled test_images/ (Kaggle's hidden test set)
    workers: NonNegativeInt = 0  # processes drawing images; 0 = all cores


def class_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split ``n`` into per-class counts by largest remainders (every class gets at least one)."""
    f = np.asarray(fractions, dtype=float) / np.sum(fractions)
    raw = f * n
    counts = np.maximum(np.floor(raw).astype(int), 1 if n >= len(f) else 0)
    while counts.sum() < n:
        counts[np.argmax(raw - counts)] += 1
    while counts.sum() > n:
        counts[np.argmax(counts)] -= 1
    return counts.tolist()


def sample_table(options: SampleOptions) -> pd.DataFrame:
    """Kaggle's train.csv for the sample: image_id (``<digits>.jpg``) and label, shuffled."""
    rng = np.random.default_rng([options.seed, 0])
    counts = class_counts(options.n_images, options.class_fractions)
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = labels[rng.permutation(len(labels))]
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < len(labels):  # unique Kaggle-like ids
        i = int(rng.integers(10**8, 5 * 10**9))
        if i not in seen:
            seen.add(i)
            ids.append(i)
    return pd.DataFrame({"image_id": [f"{i}.jpg" for i in ids], "label": labels})


def test_table(options: SampleOptions, n: int) -> pd.DataFrame:
    """Unlabeled images for ``test_images/`` (Kaggle's hidden test set): ``n`` images drawn from
    their own random stream (seed + 1), so they never repeat a training image; their labels,
    which Kaggle keeps hidden, are returned for evaluation but written nowhere by the pipeline."""
    taken = set(sample_table(options)["image_id"])
    table = sample_table(replace(options, n_images=n, seed=options.seed + 1))
    return table[~table["image_id"].isin(taken)].reset_index(drop=True)


def label_map(n_classes: int = 5) -> dict[str, str]:
    """Kaggle's label_num_to_disease_map.json."""
    return {str(i): CASSAVA_CLASSES[i] for i in range(n_classes)}


def lazy_images(
    table: pd.DataFrame, options: SampleOptions, *, workers: int = 0
) -> dict[str, Callable[[], Image.Image]]:
    """{image id without extension: function drawing it}, for a PartitionedDataset's lazy save.

    The images are drawn ahead, in order of id (the order the dataset saves in), by a pool of
    ``workers`` processes (0: all cores); each function hands over its image once drawn.
    """
    ids = [str(i).rsplit(".", 1)[0] for i in table["image_id"]]
    labels = [int(v) for v in table["label"]]
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    producer = _Prefetcher(order, labels, options, resolve_workers(workers))
    return {ids[i]: partial(producer.get, i) for i in range(len(ids))}


def _draw_chunk(args: tuple[list[int], list[int], SampleOptions]) -> list[tuple[int, Image.Image]]:
    indices, labels, options = args
    return [
        (i, draw_image(label, np.random.default_rng([options.seed, 1, i]), options))
        for i, label in zip(indices, labels, strict=True)
    ]


class _Prefetcher:
    """Draws images in a process pool, in a fixed order, and keeps each until it is asked for."""

    def __init__(self, order: list[int], labels: list[int], options: SampleOptions, workers: int):
        chunks = [order[i : i + 8] for i in range(0, len(order), 8)]
        self._tasks = [(c, [labels[i] for i in c], options) for c in chunks]
        self._workers = workers
        self._results = None
        self._ready: dict[int, Image.Image] = {}

    def get(self, i: int) -> Image.Image:
        if self._results is None:
            self._results = ordered_map(_draw_chunk, self._tasks, workers=self._workers)
        while i not in self._ready:
            self._ready.update(next(self._results))
        return self._ready.pop(i)


# ---------------------------------------------------------------------------------------------
# drawing


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] of size h x w (a coarse random grid, bicubic upscaled)."""
    gw, gh = max(2, cells), max(2, round(cells * h / w))
    grid = (rng.random((gh, gw)) * 255).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((w, h), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    palettes = [
        ((118, 86, 58), (84, 60, 40)),  # bare soil
        ((96, 120, 60), (60, 82, 38)),  # grass and weeds
        ((150, 128, 92), (104, 86, 60)),  # dry litter
        ((70, 80, 52), (40, 46, 30)),  # shaded undergrowth
    ]
    a, b = palettes[rng.integers(len(palettes))]
    # Drawn at a quarter of the size and upscaled: it is smooth anyway, and 16x cheaper.
    sw, sh = max(2, w // 4), max(2, h // 4)
    t = _smooth_noise(rng, sw, sh, int(rng.integers(4, 12)))[..., None]
    base = np.array(a, np.float32) * t + np.array(b, np.float32) * (1 - t)
    base += 10 * rng.standard_normal((sh, sw, 1), dtype=np.float32)  # mottling of the ground
    small = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    img = small.resize((w, h), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(20, 80))):  # stalks, twigs and grass blades
        x, y = rng.integers(0, w), rng.integers(0, h)
        ang, length = rng.uniform(0, 2 * math.pi), rng.uniform(15, 90)
        col = tuple(int(c) for c in np.clip(np.array(b) + rng.normal(0, 30, 3), 0, 255))
        d.line(
            [(x, y), (x + length * math.cos(ang), y + length * math.sin(ang))],
            fill=col,
            width=int(rng.integers(1, 4)),
        )
    return img


def _leaflet_polygon(
    cx: float, cy: float, angle: float, length: float, width: float, wobble: float, rng
) -> list[tuple[float, float]]:
    """A lance-shaped leaflet from the leaf centre outwards; ``wobble`` distorts its edges."""
    n = 14
    t = np.linspace(0, 1, n)
    half = width * np.sin(np.pi * t**0.8) * (1 - 0.15 * t)  # widest a third of the way out
    half = half * (1 + wobble * rng.normal(0, 1, n).cumsum() / 4)
    bend = wobble * 0.25 * length * np.sin(np.pi * t) * rng.choice([-1, 1])  # curling
    ca, sa = math.cos(angle), math.sin(angle)
    pts_left, pts_right = [], []
    for ti, hw, b in zip(t, np.abs(half), bend, strict=True):
        along = ti * length
        for side, pts in ((1, pts_left), (-1, pts_right)):
            off = side * hw + b
            pts.append((cx + along * ca - off * sa, cy + along * sa + off * ca))
    return pts_left + pts_right[::-1]


def _draw_leaf(rng: np.random.Generator, label: int, severity: float) -> Image.Image:
    """One palmate leaf with the symptoms of ``label`` on an RGBA canvas."""
    size = 400
    cx = cy = size / 2
    n_lobes = int(rng.integers(5, 8))
    spread = rng.uniform(0.75, 0.95) * math.pi
    base_angle = rng.uniform(0, 2 * math.pi)
    cmd = label == CMD and severity > 0
    green = np.array([56, 122, 48]) + rng.normal(0, 12, 3)
    if label == CGM and severity > 0:
        green = green * (1 - 0.25 * severity) + np.array([150, 190, 120]) * 0.25 * severity
    green = tuple(int(c) for c in np.clip(green, 0, 255))

    mask = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(mask)
    leaf = Image.new("RGB", (size, size), green)
    draw = ImageDraw.Draw(leaf)
    lobes = []
    for k in range(n_lobes):
        angle = base_angle - spread / 2 + spread * k / (n_lobes - 1)
        length = rng.uniform(120, 185) * (1 - 0.25 * abs(k - (n_lobes - 1) / 2) / n_lobes)
        width = rng.uniform(18, 28) * (0.55 if cmd and severity > 0.4 else 1.0)
        wobble = (0.35 + 0.6 * severity) if cmd else rng.uniform(0.0, 0.12)
        if cmd:
            length *= rng.uniform(0.7, 0.95)  # shrunken leaflets
        poly = _leaflet_polygon(cx, cy, angle, length, width, wobble, rng)
        mdraw.polygon(poly, fill=255)
        lobes.append((angle, length, width))
    # Natural shading between leaflets, and veins.
    shade = _smooth_noise(rng, size, size, 6)[..., None]
    arr = np.asarray(leaf, np.float32) * (0.85 + 0.3 * shade)
    leaf = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(leaf)
    vein = tuple(int(min(255, c * 1.35 + 20)) for c in green)
    for angle, length, width in lobes:
        ca, sa = math.cos(angle), math.sin(angle)
        draw.line([(cx, cy), (cx + length * ca, cy + length * sa)], fill=vein, width=3)
        for j in range(1, 6):  # secondary veins
            a = j / 6 * length
            for side in (1, -1):
                bx, by = cx + a * ca, cy + a * sa
                ex = bx + 0.9 * width * (ca * 0.6 - side * sa)
                ey = by + 0.9 * width * (sa * 0.6 + side * ca)
                draw.line([(bx, by), (ex, ey)], fill=vein, width=1)
    if severity > 0 and label != HEALTHY:
        leaf = _symptoms(leaf, mask, rng, label, severity, lobes, (cx, cy))
    elif rng.random() < 0.3:  # dirt specks on healthy leaves: small, dark, no halo
        d = ImageDraw.Draw(leaf)
        for _ in range(int(rng.integers(1, 5))):
            x, y = rng.uniform(80, 320, 2)
            r = rng.uniform(1.5, 4)
            d.ellipse([x - r, y - r, x + r, y + r], fill=(70, 60, 40))
    # Petiole.
    pet_angle = base_angle + math.pi + rng.uniform(-0.3, 0.3)
    pet_len = rng.uniform(60, 110)
    end = (cx + pet_len * math.cos(pet_angle), cy + pet_len * math.sin(pet_angle))
    ImageDraw.Draw(leaf).line([(cx, cy), end], fill=(150, 60, 50), width=5)
    ImageDraw.Draw(mask).line([(cx, cy), end], fill=255, width=5)
    out = leaf.convert("RGBA")
    out.putalpha(mask.filter(ImageFilter.GaussianBlur(0.8)))
    return out


def _symptoms(leaf, mask, rng, label, severity, lobes, centre) -> Image.Image:
    size = leaf.size[0]
    cx, cy = centre
    leaf_arr = np.asarray(leaf, np.float32)
    inside = np.asarray(mask, np.float32)[..., None] / 255.0
    overlay = Image.new("RGB", leaf.size, (0, 0, 0))
    alpha = Image.new("L", leaf.size, 0)
    od, ad = ImageDraw.Draw(overlay), ImageDraw.Draw(alpha)

    def on_leaf_point():
        angle, length, _ = lobes[rng.integers(len(lobes))]
        a = rng.uniform(0.2, 0.9) * length
        return cx + a * math.cos(angle), cy + a * math.sin(angle), angle, length

    if label == CBB:
        for _ in range(int(3 + 14 * severity)):
            x, y, *_ = on_leaf_point()
            r = rng.uniform(5, 14)
            halo = [
                (x + 1.7 * r * math.cos(t), y + 1.7 * r * math.sin(t))
                for t in np.sort(rng.uniform(0, 6.3, 6))
            ]
            od.polygon(halo, fill=(205, 195, 70))
            ad.polygon(halo, fill=150)
            lesion = [
                (x + r * math.cos(t), y + r * math.sin(t)) for t in np.sort(rng.uniform(0, 6.3, 5))
            ]
            od.polygon(lesion, fill=(96, 62, 30))
            ad.polygon(lesion, fill=245)
        for _ in range(int(2 * severity * len(lobes) / 3)):  # blighted tips
            angle, length, width = lobes[rng.integers(len(lobes))]
            tip = (cx + length * math.cos(angle), cy + length * math.sin(angle))
            r = width * 1.2
            od.ellipse([tip[0] - r, tip[1] - r, tip[0] + r, tip[1] + r], fill=(120, 90, 45))
            ad.ellipse([tip[0] - r, tip[1] - r, tip[0] + r, tip[1] + r], fill=200)
        blur = 1.5
    elif label == CBSD:
        for angle, length, width in lobes:
            ca, sa = math.cos(angle), math.sin(angle)
            for j in range(1, 6):
                if rng.random() > 0.35 + 0.6 * severity:
                    continue
                a = j / 6 * length
                for side in (1, -1):
                    bx, by = cx + a * ca, cy + a * sa
                    ex = bx + 0.9 * width * (ca * 0.6 - side * sa)
                    ey = by + 0.9 * width * (sa * 0.6 + side * ca)
                    od.line([(bx, by), (ex, ey)], fill=(215, 200, 60), width=int(6 + 6 * severity))
                    ad.line([(bx, by), (ex, ey)], fill=200, width=int(6 + 6 * severity))
            if rng.random() < severity:  # brown streak along the midrib
                s, e = rng.uniform(0.1, 0.5), rng.uniform(0.6, 0.95)
                od.line(
                    [
                        (cx + s * length * ca, cy + s * length * sa),
                        (cx + e * length * ca, cy + e * length * sa),
                    ],
                    fill=(110, 70, 35),
                    width=3,
                )
                ad.line(
                    [
                        (cx + s * length * ca, cy + s * length * sa),
                        (cx + e * length * ca, cy + e * length * sa),
                    ],
                    fill=220,
                    width=3,
                )
        blur = 2.5
    elif label == CGM:
        for _ in range(int(25 + 90 * severity)):
            x, y, *_ = on_leaf_point()
            x, y = x + rng.normal(0, 6), y + rng.normal(0, 6)
            r = rng.uniform(1.5, 4.5)
            od.ellipse([x - r, y - r, x + r, y + r], fill=(200, 225, 170))
            ad.ellipse([x - r, y - r, x + r, y + r], fill=int(120 + 100 * severity))
        blur = 1.2
    else:  # CMD: a yellow-green mosaic
        t = _smooth_noise(rng, size, size, int(rng.integers(10, 18)))
        patches = (t > 0.62 - 0.25 * severity).astype(np.uint8) * int(140 + 100 * severity)
        alpha = Image.fromarray(patches, "L")
        overlay = Image.new("RGB", leaf.size, (200, 210, 70))
        blur = 3.0
    a = np.asarray(alpha.filter(ImageFilter.GaussianBlur(blur)), np.float32)[..., None] / 255.0
    a *= inside
    out = leaf_arr * (1 - a) + np.asarray(overlay, np.float32) * a
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def draw_image(label: int, rng: np.random.Generator, options: SampleOptions) -> Image.Image:
    """One sample photo of class ``label``.

    The scene is composed at half the size and upscaled (4x less drawing; the softness reads as
    a phone camera's), then lit and noised at full size.
    """
    w, h = options.width, options.height
    cw, ch = max(8, w // 2), max(8, h // 2)
    img = _background(rng, cw, ch).convert("RGBA")
    n_leaves = int(rng.integers(2, 6))
    for k in range(n_leaves):
        # The first leaf always shows the class (at least mildly); others may look healthy.
        diseased = label != HEALTHY and (k == 0 or rng.random() < 0.6)
        severity = rng.uniform(0.35, 1.0) if diseased else 0.0
        leaf = _draw_leaf(rng, label if diseased else HEALTHY, severity)
        scale = rng.uniform(1.0, 1.9) * min(cw, ch) / 600  # close-ups, as in the real photos
        side = max(8, int(leaf.width * scale))
        leaf = leaf.rotate(rng.uniform(0, 360), resample=Image.BILINEAR).resize(
            (side, side), Image.BILINEAR
        )
        x = int(rng.uniform(-0.25, 0.85) * cw) if k else int(rng.uniform(0.1, 0.6) * cw)
        y = int(rng.uniform(-0.25, 0.75) * ch) if k else int(rng.uniform(0.05, 0.5) * ch)
        img.paste(leaf, (x, y), leaf)
    rgb = np.asarray(img.convert("RGB").resize((w, h), Image.BICUBIC), np.float32)
    # Lighting: a random gradient (sun from one side), brightness and contrast.
    ang, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.35)
    gx = np.linspace(-1, 1, w, dtype=np.float32) * (strength * math.cos(ang))
    gy = np.linspace(-1, 1, h, dtype=np.float32) * (strength * math.sin(ang))
    gain, contrast = rng.uniform(0.75, 1.2), rng.uniform(0.8, 1.2)
    light = (1 + gy[:, None] + gx[None, :]) * (gain * contrast)
    rgb *= light[..., None]
    rgb += 128 * (1 - contrast)
    rgb += rng.uniform(1, 7) * rng.standard_normal(rgb.shape, dtype=np.float32)
    out = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return out
