"""The pixel differences from fastai, A/B-tested on clothing-small (issue 28): ours with the
old defaults against ours with either or both differences removed, and fastai, paired by seed.

    make bench-env && .venv-bench/bin/python benchmarks/ab_pixels.py --arms a b --seeds 0 1 ... 9
    .venv-bench/bin/python benchmarks/ab_pixels.py --report benchmarks/ab_logs/full-*.log

Arms (each ``kedro run --pipelines=cassava`` as ``fastai_compare.py`` runs ours, the recipe of
its ten-seed run: ``--epochs 2 1 1 --lr-find-iters 20``):
- ``a``: the defaults before issue 28 (``jpeg_draft: true``, ``resample: once``);
- ``b``: ``presize.jpeg_draft: false`` (full JPEG decode before the presize resize, as fastai's
  ``Resize`` item transform decodes);
- ``c``: ``augment.resample: twice`` in all three stages (fastai's two resamples: the affine
  and warp at the presize resolution with reflection padding, then the whole-pixel crop resized);
- ``d``: ``b`` and ``c`` together (fastai's pixels on both counts; the defaults since).
- ``fastai``: fastai 2.8.12's arm as ``fastai_compare.py`` runs it (0 DataLoader workers, its
  fastest here). It is bit-reproducible, so it is run once per seed and data set: fastai_compare's
  ten-seed figures (RESULTS.md) are its values for the full training set.
Prints each run as it ends, then per arm mean and sd of plain and TTA accuracy, and per arm
against ``a`` (and against ``fastai``) the paired differences and a paired t-test.
``--report`` reads such lines (``arm X seed N: ...``, and fastai_compare's ``fastai seed N: ...``)
from saved logs, several sessions' runs together, and prints the same summary over the seeds
each pair of arms shares; a seed run twice must have given the same figures.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fastai_compare as fc

# Each arm sets both settings, so that an arm means the same whatever the defaults are.
STAGES = ("frozen", "unfrozen", "mixup")


def _arm(draft: bool, resample: str) -> dict:
    return {
        **{f"{side}.presize.jpeg_draft": draft for side in ("small", "large")},
        **{f"{stage}.train.augment.resample": resample for stage in STAGES},
    }


ARMS = {
    "a": _arm(True, "once"),
    "b": _arm(False, "once"),
    "c": _arm(True, "twice"),
    "d": _arm(False, "twice"),
}


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean and sd of b - a, and the two-sided p of a paired t-test."""
    from scipy import stats

    d = [y - x for x, y in zip(a, b, strict=True)]
    mean, sd = statistics.mean(d), statistics.stdev(d) if len(d) > 1 else math.nan
    p = float(stats.ttest_rel(b, a).pvalue) if len(d) > 1 and sd > 0 else math.nan
    return mean, sd, p


LINE = re.compile(
    r"^(?:#\s*)?(?:arm (?P<arm>\w+)|(?P<fastai>fastai))\s+seed (?P<seed>\d+): "
    r"acc(?:uracy)? (?P<acc>[\d.]+) tta (?P<tta>[\d.]+)"
)


def read_logs(paths: list[str]) -> dict[str, dict[int, dict[str, float]]]:
    """Each arm's figures per seed from printed run lines; a seed seen twice must agree."""
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            m = LINE.match(line.strip())
            if not m:
                continue
            arm = m["arm"] or "fastai"
            out = {"accuracy": float(m["acc"]), "tta_accuracy": float(m["tta"])}
            seen = runs.setdefault(arm, {}).setdefault(int(m["seed"]), out)
            if seen != out:
                sys.exit(f"{path}: arm {arm} seed {m['seed']} gave {out}, elsewhere {seen}")
    return runs


def summary(runs: dict[str, dict[int, dict[str, float]]]) -> None:
    """Per arm mean ± sd; per arm against a and against fastai, paired over shared seeds."""
    for arm, by_seed in runs.items():
        for key in ("accuracy", "tta_accuracy"):
            values = [o[key] for o in by_seed.values()]
            sd = statistics.stdev(values) if len(values) > 1 else math.nan
            print(f"arm {arm} {key}: {statistics.mean(values):.4f} ± {sd:.4f} (n={len(values)}, "
                  f"seeds {sorted(by_seed)})")  # fmt: skip
    for base in ("a", "fastai"):
        for arm, by_seed in runs.items():
            if arm == base or base not in runs or arm == "fastai":
                continue
            seeds = sorted(set(by_seed) & set(runs[base]))
            for key in ("accuracy", "tta_accuracy"):
                mean, sd, p = paired(
                    [runs[base][s][key] for s in seeds], [by_seed[s][key] for s in seeds]
                )
                print(f"arm {arm} - arm {base}, {key}: {mean:+.4f} ± {sd:.4f}, paired t-test "
                      f"p = {p:.3f} (n={len(seeds)})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=["a", "b"])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--report", nargs="+", metavar="LOG", help="summarise saved logs; no runs")
    args = ap.parse_args()
    if args.report:
        summary(read_logs(args.report))
        return
    unknown = [a for a in args.arms if a not in ARMS and a != "fastai"]
    if unknown:
        sys.exit(f"arms {unknown}: unknown; arms here: {sorted(ARMS)} and fastai")
    defaults = argparse.Namespace(
        presize_small=160, presize_large=192, size_small=128, size_large=160,
        epochs=[2, 1, 1], lr=2e-3, batch_size=32, lr_find_iters=20,
    )  # fmt: skip
    base = fc.recipe(defaults)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {' '.join(sys.argv)}")
    runs: dict[str, dict[int, dict[str, float]]] = {a: {} for a in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        data = fc.prepare_data(Path(tmp), args.train_limit)
        fc.make_project(Path(tmp) / "ours-project", data)
        n_train = sum(1 for _ in (data / "train").rglob("*.jpg"))
        print(f"# clothing-small: {n_train} training photos", flush=True)
        for seed in args.seeds:
            for arm in args.arms:
                t = time.perf_counter()
                if arm == "fastai":
                    spawn_args = argparse.Namespace(fastai_workers=0)
                    out = fc.spawn("fastai", data, seed, base, Path(tmp), spawn_args)
                else:
                    r = {**base, "ours_params": ARMS[arm]}
                    out = fc.run_ours(data, seed, r, Path(tmp) / f"ours-{seed}", 0)
                runs[arm][seed] = out
                took = time.perf_counter() - t
                print(f"arm {arm} seed {seed}: accuracy {out['accuracy']:.4f} tta "
                      f"{out['tta_accuracy']:.4f} ({took:.0f} s)", flush=True)  # fmt: skip
    summary(runs)


if __name__ == "__main__":
    main()
