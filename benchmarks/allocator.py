"""glibc's malloc as it comes against ``runtime.malloc: tuned`` (vision/allocator.py).

    .venv/bin/python benchmarks/allocator.py [--rounds 5] [--steps 20]

The model step alone (forward, backward, AdamW step on a fixed channels-last batch; the
project's tf_efficientnet_lite0 with fastai's head), frozen at 128 and unfrozen at 160, batch 32,
each in a fresh child process with one setting, the settings taking turns round by round:
``default`` (glibc as it comes), ``tuned-mmap`` (tuned, but glibc still free to mmap blocks over
the threshold: the tuned settings before ``M_MMAP_MAX`` was set to 0) and ``tuned``. Each child
reports its images per second, the minor page faults of its timed steps, its system CPU time
and its peak resident memory. Printed for each setting: the best and the worst round's speed,
the worst round's faults and system time, and the largest peak memory of its rounds; then
tuned over default (target: faster in the worst round too, with at most 10% more peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODES = ("default", "tuned-mmap", "tuned")


def child(mode: str, stage: str, steps: int) -> None:
    from cassava_pipeline.vision import allocator

    applied = allocator.apply("tuned" if mode == "tuned-mmap" else mode)
    if mode == "tuned-mmap":  # back to glibc's default M_MMAP_MAX: blocks over 32 MiB mapped
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(allocator.M_MMAP_MAX, 65536)
        applied.pop("M_MMAP_MAX")
    import torch
    import torch.nn.functional as F

    from cassava_pipeline.vision.learner import StageConfig, make_optimizer
    from cassava_pipeline.vision.models import create_model, freeze, param_groups, unfreeze

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model, _ = create_model("tf_efficientnet_lite0", 10, "packaged")
    model.to(memory_format=torch.channels_last)
    (freeze if stage == "frozen" else unfreeze)(model)
    size = 128 if stage == "frozen" else 160
    opt = make_optimizer(
        model, [1e-4] * len(param_groups(model)), StageConfig(name="bench", epochs=1, lr=1e-4)
    )
    x = torch.randn(32, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))
    model.train()

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: oneDNN's primitives, the optimizer's state
        step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "applied": applied,
        "img_s": 32 * steps / seconds,
        "faults": after.ru_minflt - before.ru_minflt,
        "sys_s": after.ru_stime - before.ru_stime,
        "peak_mib": after.ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(out), flush=True)


def run(mode: str, stage: str, steps: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--stage", stage, "--steps", str(steps)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line.split(" ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--stage", default="frozen", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.stage, args.steps)
        return
    import torch

    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {platform.libc_ver()[0]} {platform.libc_ver()[1]}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print(f"# {' '.join(sys.argv)}")
    print("\n| stage | malloc | images/s best | images/s worst | minor faults per step (worst) "
          "| system CPU s (worst) | peak RSS MiB (largest) |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for stage in ("frozen", "unfrozen"):
        rounds: dict[str, list[dict]] = {m: [] for m in MODES}
        for i in range(args.rounds):
            shift = i % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                rounds[mode].append(run(mode, stage, args.steps))
        summary = {}
        for mode in MODES:
            rs = rounds[mode]
            best = max(rs, key=lambda r: r["img_s"])
            worst = min(rs, key=lambda r: r["img_s"])
            peak = max(r["peak_mib"] for r in rs)
            summary[mode] = (best["img_s"], worst["img_s"], peak)
            faults = worst["faults"] / args.steps
            print(f"| {stage} | {mode} | {best['img_s']:.1f} | {worst['img_s']:.1f} | "
                  f"{faults:,.0f} | {worst['sys_s']:.2f} | {peak:.0f} |")  # fmt: skip
        d, t = summary["default"], summary["tuned"]
        print(f"| {stage} | tuned / default | {t[0] / d[0]:.3f}x | {t[1] / d[1]:.3f}x | | | "
              f"{t[2] / d[2]:.3f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
