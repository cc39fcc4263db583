"""The training loop of another commit against this one's, and the bare loop, in one process.

    .venv/bin/python benchmarks/loop_versions.py --before 5d05a50 [--rounds 5]

A refactor of ``Trainer.fit`` must not slow it. ``git archive`` extracts ``--before``'s
``vision/`` package into a temporary folder under another name; both ``Trainer.fit`` versions and
``benchmarks/train.py``'s bare PyTorch loop then train one epoch of the same 320 presized sample
images at 128 px (tf_efficientnet_lite0, batch 32, CPU), in interleaved rounds (the order turned
each round). Prints each round's images/s, the best of each, the overhead of each loop against
the bare one and this commit's time against ``--before``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train as bench
from cassava_pipeline.vision.allocator import tune_malloc
from cassava_pipeline.vision.models import create_model
from cassava_pipeline.vision.run import make_fabric

REPO = Path(__file__).resolve().parents[1]


def vision_of(rev: str, into: Path):
    """``rev``'s ``cassava_pipeline.vision`` as the package ``vision_<rev>`` (its modules import
    each other relatively, so the copy stands alone)."""
    data = subprocess.run(
        ["git", "archive", rev, "src/cassava_pipeline/vision"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    name = f"vision_{rev}"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    (into / "src" / "cassava_pipeline" / "vision").rename(into / name)
    sys.path.insert(0, str(into))
    return importlib.import_module(f"{name}.learner"), importlib.import_module(f"{name}.augment")


def stage(learner, augment, data):
    """The same stage for either loop (before 2026-12: the size inside ``augment``)."""
    names = {f.name for f in dataclasses.fields(learner.StageConfig)}
    sized = (
        {"size": 128, "augment": augment.AugmentOptions(min_scale=0.75)}
        if "size" in names
        else {"augment": augment.AugmentOptions(size=128, min_scale=0.75)}
    )
    return learner.StageConfig(
        name="bench", epochs=1, lr=(1e-5, 1e-3), freeze=False, **sized,
        loader=data.LoaderOptions(batch_size=32, num_workers=0),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tune_malloc()
    from cassava_pipeline.vision import augment, data, learner

    print(
        f"# loop versions, {time.strftime('%Y-%m-%d %H:%M')} UTC, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}: {args.before} against the working tree"
    )
    fabric = make_fabric(learner.RuntimeConfig(accelerator="cpu", progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        old_learner, old_augment = vision_of(args.before, Path(tmp))
        old_pkg = old_learner.__name__.rpartition(".")[0]
        old_data = importlib.import_module(f"{old_pkg}.data")
        configs = {
            "this": (learner.Trainer, stage(learner, augment, data)),
            "before": (old_learner.Trainer, stage(old_learner, old_augment, old_data)),
        }
        shards = bench.shards_for(Path(tmp), 160)
        train, valid = shards.split()
        train = train.subset(torch.arange(min(320, len(train))).numpy())
        empty = valid.subset([])
        n = (len(train) // 32) * 32
        best: dict[str, float] = {}
        for r in range(args.rounds):
            order = ("this", "before", "bare")
            for which in order if r % 2 == 0 else order[::-1]:
                model, stats = create_model("tf_efficientnet_lite0", len(shards.classes), "none")
                if which == "bare":  # its loop alone, as benchmarks/train.py times it
                    seconds = bench.bare(model, stats, train, configs["this"][1], fabric, False)
                else:
                    trainer, cfg = configs[which]
                    t0 = time.perf_counter()
                    trainer(fabric, model, stats, progress=False).fit(train, empty, cfg)
                    seconds = time.perf_counter() - t0
                rate = n / seconds
                best[which] = max(best.get(which, 0.0), rate)
                print(f"round {r} {which}: {rate:.1f} img/s", flush=True)
    for which, rate in best.items():
        print(f"{which}: {rate:.1f} img/s (best of {args.rounds})")
    for which in ("this", "before"):
        print(f"overhead of {which} vs bare: {100 * (best['bare'] / best[which] - 1):.1f}%")
    print(f"this / before (time): {best['before'] / best['this']:.3f}")


if __name__ == "__main__":
    main()
