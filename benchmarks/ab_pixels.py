"""The pixel differences from fastai, A/B-tested on clothing-small (issue 28): ours with
today's defaults against ours with one difference removed, paired by seed.

    make bench-env && .venv-bench/bin/python benchmarks/ab_pixels.py --arms a b --seeds 0 1 ... 9

Arms (each ``kedro run --pipelines=cassava`` as ``fastai_compare.py`` runs ours, the recipe of
its ten-seed run: ``--epochs 2 1 1 --lr-find-iters 20``):
- ``a``: today's defaults;
- ``b``: ``presize.jpeg_draft: false`` (full JPEG decode before the presize resize, as fastai's
  ``Resize`` item transform decodes);
- ``c``: ``augment.resample: twice`` in all three stages (fastai's two resamples: the affine
  and warp at the presize resolution with reflection padding, then the whole-pixel crop resized);
- ``d``: ``b`` and ``c`` together (fastai's pixels on both counts).
fastai's arm is not rerun: it is bit-reproducible, and fastai_compare's ten-seed figures
(RESULTS.md) are its values for these seeds. Prints each run as it ends, then per arm mean and
sd of plain and TTA accuracy, and per arm against ``a`` the paired differences and a paired t-test.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fastai_compare as fc

FULL_DECODE = {"small.presize.jpeg_draft": False, "large.presize.jpeg_draft": False}
TWICE = {f"{stage}.train.augment.resample": "twice" for stage in ("frozen", "unfrozen", "mixup")}
ARMS = {"a": {}, "b": FULL_DECODE, "c": TWICE, "d": {**FULL_DECODE, **TWICE}}


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean and sd of b - a, and the two-sided p of a paired t-test."""
    from scipy import stats

    d = [y - x for x, y in zip(a, b, strict=True)]
    mean, sd = statistics.mean(d), statistics.stdev(d) if len(d) > 1 else math.nan
    p = float(stats.ttest_rel(b, a).pvalue) if len(d) > 1 and sd > 0 else math.nan
    return mean, sd, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=["a", "b"])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--train-limit", type=int, default=None)
    args = ap.parse_args()
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        sys.exit(f"arms {unknown}: unknown; arms here: {sorted(ARMS)}")
    defaults = argparse.Namespace(
        presize_small=160, presize_large=192, size_small=128, size_large=160,
        epochs=[2, 1, 1], lr=2e-3, batch_size=32, lr_find_iters=20,
    )  # fmt: skip
    base = fc.recipe(defaults)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {' '.join(sys.argv)}")
    results: dict[str, list[dict]] = {a: [] for a in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        data = fc.prepare_data(Path(tmp), args.train_limit)
        fc.make_project(Path(tmp) / "ours-project", data)
        for seed in args.seeds:
            for arm in args.arms:
                r = {**base, "ours_params": ARMS[arm]}
                t = time.perf_counter()
                out = fc.run_ours(data, seed, r, Path(tmp) / f"ours-{seed}", 0)
                results[arm].append(out)
                took = time.perf_counter() - t
                print(f"arm {arm} seed {seed}: accuracy {out['accuracy']:.4f} tta "
                      f"{out['tta_accuracy']:.4f} ({took:.0f} s)", flush=True)  # fmt: skip
    for arm, outs in results.items():
        for key in ("accuracy", "tta_accuracy"):
            values = [o[key] for o in outs]
            sd = statistics.stdev(values) if len(values) > 1 else math.nan
            print(f"arm {arm} {key}: {statistics.mean(values):.4f} ± {sd:.4f} (n={len(values)})")
    for arm in args.arms:
        if arm == "a" or "a" not in results:
            continue
        for key in ("accuracy", "tta_accuracy"):
            mean, sd, p = paired([o[key] for o in results["a"]], [o[key] for o in results[arm]])
            print(f"arm {arm} - arm a, {key}: {mean:+.4f} ± {sd:.4f}, paired t-test p = {p:.3f}")


if __name__ == "__main__":
    main()
