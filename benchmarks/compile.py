"""Does ``torch.compile`` pay for itself on this machine? One training step, eager and compiled.

    .venv/bin/python benchmarks/compile.py [--arch ARCH] [--size 160] [--batch-size 32]

The training step of ``benchmarks/train.py`` (channels-last, AdamW as ours, a fixed random batch):
seconds per step eagerly and compiled, the compile time (the first compiled step) and after how
many steps the compiled model has made up for it. ``compile: true`` in a stage's parameters
turns it on. Inductor caches what it compiled (``TORCHINDUCTOR_CACHE_DIR``): point it at an
empty folder to time a cold compile, as a fresh machine sees it.
"""

from __future__ import annotations

import argparse
import time

import torch

from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.learner import StageConfig
from train import model_step  # benchmarks/train.py: the same step it times as "model alone"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    cfg = StageConfig(
        name="probe",
        epochs=1,
        lr=1e-4,
        size=args.size,
        loader=LoaderOptions(batch_size=args.batch_size),
    )
    cpu = torch.device("cpu")

    def timed(step, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - t

    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {args.arch}, size {args.size}, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {now}")  # fmt: skip
    step = model_step(args.arch, 10, cfg, cpu, channels_last=True, bf16=False)
    timed(step, 2)  # warm-up
    eager = timed(step, args.steps) / args.steps
    print(f"eager: {eager:.3f} s/step", flush=True)
    step = model_step(args.arch, 10, cfg, cpu, channels_last=True, bf16=False, compile=True)
    first = timed(step, 1)
    timed(step, 2)
    compiled = timed(step, args.steps) / args.steps
    gain = eager - compiled
    even = f"{first / gain:.0f} steps" if gain > 0 else "never"
    print(f"compiled: {compiled:.3f} s/step after {first:.1f} s for compiling and the first step; "
          f"speed-up {eager / compiled:.2f}x; break-even after {even}")  # fmt: skip


if __name__ == "__main__":
    main()
