"""Cross-validation, label issues and the fold ensemble on real photos with planted label noise.

    .venv/bin/python benchmarks/cv.py [--folds 5 --flip 0.05 --seeds 1 2 3]

On ``../shared/datasets/clothing-small`` (3,068 training photos in 10 class folders, 341 in
``validation/``), with ``--flip`` of the training labels moved to another class at random
(seeded: the same photos every run; the flips are printed), in copies of this project run as a
user runs it (``kedro run``, the recipe of ``fastai_compare.py``: presize 160/192, sizes 128/160,
2 + 1 + 1 epochs, fixed rates):

1. ``cassava_cv``, ``--folds`` folds: the precision and recall of the flipped photos among
   cleanlab's label issues (target: recall >= 0.6 at precision >= 0.5); the out-of-fold
   accuracy and its interval; the fold ensemble's accuracy on the validation folder (the
   held-out side) against the mean single fold's;
2. ``cassava_cv_clean`` with ``cv.label_issues`` keep, drop and relabel (same seeds,
   ``--round-seeds``; ``--issue-limit N`` adds dropping the first N suspects only): accuracy
   on the untouched validation folder;
3. ``cassava`` (one split: the validation folder) with ``--seeds``: the single-split accuracy's
   spread over seeds, against the CV interval (does CV estimate what a user sees?);
4. cost: the whole CV run against ``--folds`` times one fold run from scratch (a fresh project
   running ingest, presize, the folds and fold 0 only, as a user running folds by hand would),
   and the peak memory (resident set, from the kernel's accounting of each run) of the two.

Every figure is printed by this script; RESULTS.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import fastai_compare as fc

REPO = fc.REPO
DATA = fc.DATA


def prepare_data(
    root: Path, flip: float, seed: int, limit: int | None = None
) -> tuple[Path, list[dict]]:
    """Links to clothing-small: validation/ untouched, train/ (its first ``limit`` photos, in
    class order, if given) with ``flip`` of the photos in another class's folder (seeded);
    returns the folder and the flips."""
    out = root / "clothing"
    classes = sorted(p.name for p in (DATA / "train").iterdir() if p.is_dir())
    photos = [(c, p) for c in classes for p in sorted((DATA / "train" / c).iterdir())]
    if limit:
        photos = random.Random(seed).sample(photos, limit)
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(photos)), round(flip * len(photos))))
    flips = []
    for i, (cls, path) in enumerate(photos):
        label = cls
        if i in chosen:
            label = rng.choice([c for c in classes if c != cls])
            flips.append({"path": f"train/{label}/{path.name}", "true": cls, "given": label})
        (out / "train" / label).mkdir(parents=True, exist_ok=True)
        (out / "train" / label / path.name).symlink_to(path)
    for cls in classes:
        (out / "validation" / cls).mkdir(parents=True)
        for path in sorted((DATA / "validation" / cls).iterdir()):
            (out / "validation" / cls / path.name).symlink_to(path)
    return out, flips


def kedro(project: Path, params: dict, *args: str) -> dict:
    """``kedro run`` in ``project`` with ``params``: its wall time and peak resident memory."""
    import yaml

    (project / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kedro", "run", *args],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    err = proc.stderr.read()
    # this run's own accounting (Linux: its peak, and its reaped workers' if larger)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"kedro run {' '.join(args)}:\n{err[-4000:]}")
    warnings = [line for line in err.splitlines() if "WARNING" in line or "Warning" in line]
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "warnings": warnings}


def params(seed: int, r: dict, folds: int, action: str = "keep", limit: int | None = None) -> dict:
    out = fc._params(seed, r)
    out["cv"] = {"folds": folds, "seed": 42, "label_issues": action, "issue_limit": limit}
    return out


def report_flips(project: Path, flips: list[dict]) -> dict:
    issues = pd.read_csv(project / "data" / "08_reporting" / "label_issues.csv")
    flipped = {f["path"] for f in flips}
    found = set(issues["image"]) & flipped
    precision = len(found) / max(1, len(issues))
    recall = len(found) / max(1, len(flipped))
    # along cleanlab's ranking (most suspect first): precision and recall of the first k
    hits = issues["image"].isin(flipped).cumsum().to_numpy()
    k = np.arange(1, len(issues) + 1)
    curve = pd.DataFrame({"k": k, "precision": hits / k, "recall": hits / max(1, len(flipped))})
    usable = curve[curve["precision"] >= 0.5]
    best = usable.loc[usable["recall"].idxmax()] if len(usable) else None
    return {
        "issues": len(issues),
        "flips": len(flipped),
        "found": len(found),
        "precision": precision,
        "recall": recall,
        "curve": curve[curve["k"].isin([len(flipped) // 2, len(flipped), 2 * len(flipped)])],
        "best": best,
    }


def reading(project: Path, name: str) -> dict:
    return json.loads((project / "data" / "08_reporting" / name).read_text())


def report_accuracy(project: Path, args: argparse.Namespace, r: dict, flips: list[dict]) -> None:
    """Parts 1 to 3 of the docstring, after the CV run."""
    metrics = reading(project, "cv_metrics.json")
    held = reading(project, "cv_held_out_metrics.json")
    print(
        f"out-of-fold accuracy {metrics['accuracy']:.4f} "
        f"({100 * metrics['confidence']:.0f}% interval {metrics['interval'][0]:.4f} to "
        f"{metrics['interval'][1]:.4f}); folds {metrics['fold_accuracy_mean']:.4f} +- "
        f"{metrics['fold_accuracy_std']:.4f}: "
        + ", ".join(f"{a:.4f}" for a in metrics["fold_accuracy"])
    )
    print(
        f"validation folder ({held['n_images']} photos): ensemble of {args.folds} "
        f"{held['ensemble_accuracy']:.4f}, single folds {held['fold_accuracy_mean']:.4f} "
        "mean: " + ", ".join(f"{a:.4f}" for a in held["fold_accuracy"])
    )
    found = report_flips(project, flips)
    print(
        f"label issues {found['issues']}: {found['found']} of the {found['flips']} flips; "
        f"precision {found['precision']:.3f}, recall {found['recall']:.3f} over all of them"
    )
    for row in found["curve"].itertuples():
        print(f"  the first {row.k}: precision {row.precision:.3f}, recall {row.recall:.3f}")
    best = found["best"]
    if best is None:
        print("  no cut of the ranking reaches precision 0.5 (target: recall >= 0.6 there)")
    else:
        print(
            f"  the deepest cut at precision >= 0.5: the first {int(best['k'])}, precision "
            f"{best['precision']:.3f}, recall {best['recall']:.3f} (target: recall >= 0.6)"
        )

    rounds = second_rounds(project, args, r)
    if args.skip_single:
        return

    single = []
    for seed in args.seeds:
        run = kedro(project, params(seed, r, args.folds), "--pipelines=cassava")
        m = reading(project, "metrics.json")
        single.append(m["with_tta"]["accuracy"])
        print(
            f"single split seed {seed}: validation accuracy {m['plain']['accuracy']:.4f}, "
            f"with TTA {m['with_tta']['accuracy']:.4f} ({run['seconds']:.1f} s)"
        )
    single.append(rounds[("keep", args.seed)]["with_tta"]["accuracy"])  # the keep round: --seed
    mean = sum(single) / len(single)
    sd = (sum((a - mean) ** 2 for a in single) / (len(single) - 1)) ** 0.5
    low, high = metrics["interval"]
    inside = sum(low <= a <= high for a in single)
    print(
        f"single-split TTA accuracy over {len(single)} seeds: {mean:.4f} +- {sd:.4f} "
        f"(min {min(single):.4f}, max {max(single):.4f}); {inside} of {len(single)} inside "
        f"the CV interval {low:.4f} to {high:.4f}"
    )


def second_rounds(project: Path, args: argparse.Namespace, r: dict) -> dict:
    """Part 2: ``cassava_cv_clean`` per action and seed (``--round-seeds``; relabel at
    ``--seed`` only; ``--issue-limit N`` adds a round dropping the first N suspects), each
    action's mean and sd over the seeds, and drop's difference to keep seed by seed."""
    rounds: dict[tuple[str, int], dict] = {}
    seeds = args.round_seeds or [args.seed]
    actions = [("keep", None), ("drop", None)]
    if args.issue_limit is not None:
        actions.append(("drop", args.issue_limit))
    for seed in seeds:
        for action, limit in actions + ([("relabel", None)] if seed == args.seed else []):
            name = action if limit is None else f"{action} first {limit}"
            run = kedro(project, params(seed, r, args.folds, action, limit),
                        "--pipelines=cassava_cv_clean")  # fmt: skip
            m = json.loads((project / "data/08_reporting/cv_cleaned/metrics.json").read_text())
            rounds[(name, seed)] = m
            print(
                f"second round {name}, seed {seed}: validation accuracy "
                f"{m['plain']['accuracy']:.4f}, with TTA {m['with_tta']['accuracy']:.4f} "
                f"({run['seconds']:.1f} s)"
            )
    if len(seeds) > 1:
        names = [a if n is None else f"{a} first {n}" for a, n in actions]
        for name in names:
            for kind in ("plain", "with_tta"):
                a = np.array([rounds[(name, s)][kind]["accuracy"] for s in seeds])
                gain = a - np.array([rounds[("keep", s)][kind]["accuracy"] for s in seeds])
                print(
                    f"{name} over seeds {seeds}, {kind}: {a.mean():.4f} +- {a.std(ddof=1):.4f}"
                    + ("" if name == "keep" else
                       f"; minus keep, seed by seed: {gain.mean():+.4f} "
                       f"({', '.join(f'{g:+.4f}' for g in gain)})")
                )  # fmt: skip
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--flip-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="the CV run's and the rounds' seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--round-seeds", type=int, nargs="+", help="the second rounds' seeds")
    parser.add_argument("--issue-limit", type=int, help="also a round dropping the first N")
    parser.add_argument("--skip-single", action="store_true", help="no single-split runs")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument(
        "--only-cost", action="store_true", help="the CV run and one fold alone: times, memory"
    )
    parser.add_argument("--train-limit", type=int, help="that many training photos, at random")
    fc.add_recipe_args(parser, epochs=(2, 1, 1), lr_find_iters=20)
    args = parser.parse_args()
    r = fc.recipe(args)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# cv benchmark, {stamp}, {platform.machine()}, {os.cpu_count()} cores")
    if not DATA.exists():
        sys.exit(f"{DATA} is missing (the shared data sets; see ../shared/datasets/README.md)")
    print(f"# {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:
        data, flips = prepare_data(Path(tmp), args.flip, args.flip_seed, args.train_limit)
        print(f"# {len(flips)} of the training photos flipped (seed {args.flip_seed}), e.g.")
        for f in flips[:3]:
            print(f"#   {f['path']} (truly {f['true']})")
        project = fc.make_project(Path(tmp) / "project", data)

        cv = kedro(project, params(args.seed, r, args.folds), "--pipelines=cassava_cv")
        print(f"cassava_cv {args.folds} folds: {cv['seconds']:.1f} s, "
              f"peak {cv['peak_mib']:.0f} MiB; warnings: {cv['warnings'] or 'none'}")  # fmt: skip
        if not args.only_cost:
            report_accuracy(project, args, r, flips)

        if not args.skip_cost:
            # one fold from scratch, as by hand: a fresh project (its own ingest and presize)
            alone = fc.make_project(Path(tmp) / "alone", data)
            one = kedro(alone, params(args.seed, r, args.folds), "--pipelines=cassava_cv",
                        "--to-nodes=fold_0.evaluate")  # fmt: skip
            print(
                f"one fold from scratch: {one['seconds']:.1f} s; {args.folds} x that "
                f"{args.folds * one['seconds']:.1f} s against the CV run's {cv['seconds']:.1f} s: "
                f"{cv['seconds'] / (args.folds * one['seconds']):.2f}x"
            )
            print(
                f"peak resident memory: the CV run ({args.folds} folds) {cv['peak_mib']:.0f} "
                f"MiB, one fold alone {one['peak_mib']:.0f} MiB"
            )


if __name__ == "__main__":
    main()
