"""Does ``torch.compile`` pay for itself on this machine? One training step, eager and compiled.

    .venv/bin/python benchmarks/compile.py [--arch ARCH] [--size 160] [--batch-size 32]

The unfrozen stage's step (channels-last, AdamW as ours, random tensors in memory): seconds per
step eagerly and compiled, the compile time (the first compiled step) and after how many steps
the compiled model has made up for it. ``compile: true`` in a stage's parameters turns it on.
Inductor caches what it compiled (``TORCHINDUCTOR_CACHE_DIR``): point it at an empty folder to
time a cold compile, as a fresh machine sees it.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cassava_pipeline.vision.learner import StageConfig, make_optimizer
from cassava_pipeline.vision.models import create_model, param_groups, unfreeze


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    weights = "packaged" if args.arch == "tf_efficientnet_lite0" else "none"
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))

    def setup():
        torch.manual_seed(0)
        model, _ = create_model(args.arch, 10, weights)
        unfreeze(model)
        model.to(memory_format=torch.channels_last).train()
        cfg = StageConfig(name="probe", epochs=1, lr=1e-4)
        return model, make_optimizer(model, [1e-4] * len(param_groups(model)), cfg)

    def steps(model, opt, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {args.arch}, size {args.size}, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {now}")  # fmt: skip
    model, opt = setup()
    steps(model, opt, 2)  # warm-up
    eager = steps(model, opt, args.steps) / args.steps
    print(f"eager: {eager:.3f} s/step", flush=True)
    model, opt = setup()
    compiled_model = torch.compile(model)
    first = steps(compiled_model, opt, 1)
    steps(compiled_model, opt, 2)
    compiled = steps(compiled_model, opt, args.steps) / args.steps
    gain = eager - compiled
    even = f"{first / gain:.0f} steps" if gain > 0 else "never"
    print(f"compiled: {compiled:.3f} s/step after {first:.1f} s for compiling and the first step; "
          f"speed-up {eager / compiled:.2f}x; break-even after {even}")  # fmt: skip


if __name__ == "__main__":
    main()
