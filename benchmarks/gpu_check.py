"""A short GPU check of the recipe: data half, three stages, loader, memory, compile, DDP.

    bash benchmarks/gpu_check.sh               # on a CUDA machine: under 8 minutes on one H100/H200
    bash benchmarks/gpu_check.sh --cpu-smoke   # the same code paths on a CPU, tiny, under 3 minutes
    bash benchmarks/gpu_check.sh --data-only   # the stand-in and the data half alone (prepares)

Nothing is downloaded. It draws a Kaggle-shaped stand-in (``vision/sample.py``: 800x600 JPEGs in
Kaggle's layout, Kaggle's class mix) into ``--work`` or reuses the one drawn there before, then
runs what ``kedro run --env=kaggle`` runs, through the same library calls the nodes make, at
reduced epochs: ingest, split, presize at 460 and 560 (JPEG shards), and the frozen (224, batch
64), unfrozen (448, batch 32) and mixup (448, batch 32, MixUp 0.2) stages of ``conf/kaggle`` on
CUDA with bf16 and channels-last, the model randomly initialised (the weights change no timing).
It prints, per stage:

- the stage as the pipeline runs it (``train_in_fabric``, with validation): wall time, seconds
  per epoch, peak GPU memory;
- the training loop alone (``Trainer.fit`` with no validation items) in images/s, against the
  model-only step on the same GPU (forward, backward and AdamW step of the same model on a fixed
  batch of the stage's size, frozen as the stage is): target >= 0.95;
- the loader alone (shard reads, crops, collate, host-to-device copy and the batch augmentation
  on the GPU) in images/s, against the model-only step's;

then ``torch.compile`` on and off for the frozen stage's model step (compile time and images/s),
and data-parallel training (``devices: N``, DDP through Fabric) on the GPUs present (skipped, and
said so, with one). Everything goes to ``--out`` as JSON as well. Each part runs on its own: one
that fails prints its error and the others still run (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cassava_pipeline.vision.allocator import tune_malloc
from cassava_pipeline.vision.augment import AugmentOptions, BatchAugment
from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.ingest import IngestOptions, ingest
from cassava_pipeline.vision.layouts import CsvLayout
from cassava_pipeline.vision.learner import RuntimeConfig, StageConfig, Trainer, make_optimizer
from cassava_pipeline.vision.models import create_model, freeze, param_groups, unfreeze
from cassava_pipeline.vision.parallel import chunked, ordered_map, resolve_workers
from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions, write_shards
from cassava_pipeline.vision.run import make_fabric, train_in_fabric
from cassava_pipeline.vision.sample import SampleOptions, draw_image, label_map, sample_table
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.split import SplitOptions, split


@dataclass(frozen=True)
class Plan:
    """What one check runs: sizes, batches and workers of the stand-in and the three stages."""

    images: int
    arch: str
    presize: tuple[int, int]  # small (frozen stage), large (unfrozen and mixup)
    sizes: tuple[int, int]  # frozen, unfrozen/mixup
    batch: tuple[int, int]
    workers: tuple[int, int]
    epochs: int
    steps: int  # model-only steps timed
    accelerator: str
    precision: str


GPU = Plan(
    images=4000,
    arch="resnet50",  # conf/kaggle's
    presize=(460, 560),
    sizes=(224, 448),
    batch=(64, 32),
    workers=(12, 8),  # conf/kaggle's loader workers
    epochs=2,
    steps=30,
    accelerator="cuda",
    precision="bf16-mixed",
)
CPU_SMOKE = Plan(
    images=40,
    arch="resnet18",
    presize=(48, 64),
    sizes=(32, 48),
    batch=(8, 8),
    workers=(0, 2),  # in-process and worker processes, both paths
    epochs=1,
    steps=2,
    accelerator="cpu",
    precision="32-true",
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _draw(args: tuple[str, list[tuple[str, int, int]], SampleOptions]) -> int:
    folder, items, options = args
    for image_id, label, i in items:
        img = draw_image(label, np.random.default_rng([options.seed, 1, i]), options)
        img.save(Path(folder) / image_id, format="JPEG", quality=95)
    return len(items)


def stand_in(root: Path, n: int) -> dict[str, Any]:
    """Kaggle's layout with ``n`` drawn 800x600 photos under ``root``; reused when complete."""
    options = SampleOptions(n_images=n)
    table = sample_table(options)
    images = root / "train_images"
    done = root / "complete.json"
    if done.exists() and json.loads(done.read_text()) == {"n_images": n, "seed": options.seed}:
        return {"drawn": False, "images": n, "seconds": 0.0}
    images.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    items = [(r.image_id, int(r.label), i) for i, r in enumerate(table.itertuples(index=False))]
    workers = resolve_workers(0)
    tasks = [(str(images), c, options) for c in chunked(items, 8)]
    sum(ordered_map(_draw, tasks, workers=workers))
    table.to_csv(root / "train.csv", index=False)
    (root / "label_num_to_disease_map.json").write_text(json.dumps(label_map()))
    done.write_text(json.dumps({"n_images": n, "seed": options.seed}))
    return {"drawn": True, "images": n, "seconds": round(time.perf_counter() - t0, 1)}


def data_half(raw: Path, work: Path, plan: Plan) -> tuple[dict[str, Any], list[ShardedImages]]:
    """Ingest, split and presize at both sizes, timed, as the pipeline's data nodes do."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    manifest, report = ingest(raw, CsvLayout(), IngestOptions())
    out["ingest (img/s)"] = round(len(manifest) / (time.perf_counter() - t0), 1)
    classes = [c["name"] for c in report["classes"]]
    manifest, _ = split(manifest, classes, SplitOptions())
    shard_sets = []
    for size in plan.presize:
        folder = work / f"presized_{size}"
        t0 = time.perf_counter()
        if not (folder / "meta.json").exists():
            opts = PresizeOptions(size=size, encoding="jpeg")
            write_shards(PresizeJob(str(raw), manifest, tuple(classes), opts), folder)
            out[f"presize {size}, jpeg (img/s)"] = round(
                len(manifest) / (time.perf_counter() - t0), 1
            )
        else:
            out[f"presize {size}, jpeg (img/s)"] = "reused"
        shard_sets.append(ShardedImages(folder))
    return out, shard_sets


def initial_checkpoint(arch: str, classes: list[str]) -> dict[str, Any]:
    """What the init_model node produces, randomly initialised (``weights: none``)."""
    torch.manual_seed(0)
    model, stats = create_model(arch, len(classes), "none")
    return {
        "arch": arch,
        "weights": "none",
        "hidden": 512,
        "ps": 0.5,
        "concat_pool": True,
        "classes": classes,
        "mean": list(stats.mean),
        "std": list(stats.std),
        "stage": "initial",
        "model": model.state_dict(),
    }


def stages(plan: Plan) -> list[StageConfig]:
    """conf/kaggle's three stages at ``plan.epochs`` epochs each."""

    def one(name, size, batch, workers, freeze_, lr, mixup=0.0) -> StageConfig:
        return StageConfig(
            name=name,
            epochs=plan.epochs,
            lr=lr,
            freeze=freeze_,
            size=size,
            augment=AugmentOptions(min_scale=0.75),
            loader=LoaderOptions(batch_size=batch, num_workers=workers),
            mixup=mixup,
        )

    return [
        one("frozen", plan.sizes[0], plan.batch[0], plan.workers[0], True, 2e-3),
        one("unfrozen", plan.sizes[1], plan.batch[1], plan.workers[1], False, (1e-6, 1e-4)),
        one("mixup", plan.sizes[1], plan.batch[1], plan.workers[1], False, (1e-6, 1e-4), 0.2),
    ]


def model_step(arch, n_classes, cfg: StageConfig, device, bf16: bool, compile_: bool = False):
    """One optimizer step of a fresh model on a fixed random batch of the stage's size, frozen
    as the stage is, channels-last as the stage is."""
    torch.manual_seed(0)
    model, _ = create_model(arch, n_classes, "none")
    (freeze if cfg.freeze else unfreeze)(model)
    model.to(device).train()
    x = torch.randn(cfg.loader.batch_size, 3, cfg.size, cfg.size, device=device)
    y = torch.randint(0, n_classes, (cfg.loader.batch_size,), device=device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = make_optimizer(model, [1e-4] * len(param_groups(model)), cfg)
    forward = torch.compile(model) if compile_ else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def augmented_step(arch, n_classes, cfg: StageConfig, device, bf16: bool, presize: int, stats):
    """:func:`model_step` with the batch augmentation of a fixed uint8 batch of presized crops
    in front: what the loop does on the device, without the loader."""
    augment = BatchAugment(cfg.augmentation, stats.mean, stats.std)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (cfg.loader.batch_size, 3, presize, presize)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    model, _ = create_model(arch, n_classes, "none")
    (freeze if cfg.freeze else unfreeze)(model)
    model.to(device, memory_format=torch.channels_last).train()
    y = torch.randint(0, n_classes, (cfg.loader.batch_size,), device=device)
    opt = make_optimizer(model, [1e-4] * len(param_groups(model)), cfg)

    def run():
        x = augment(images, train=True, generator=gen).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def check_syncs(cfg: StageConfig, shards, plan, runtime) -> dict[str, Any]:
    """Where a training epoch makes the CPU wait for the GPU (torch.cuda.set_sync_debug_mode):
    each such call stops the CPU from queueing the next batch while the GPU works."""
    import warnings
    from collections import Counter

    fabric = make_fabric(runtime)
    if fabric.device.type != "cuda":
        return {"skipped": "CUDA only (torch.cuda.set_sync_debug_mode)"}
    train, valid = shards.split()
    n_batches = 10
    few = train.subset(np.arange(min(len(train), cfg.loader.batch_size * n_batches)))
    model, stats = create_model(plan.arch, len(shards.classes), "none")
    trainer = Trainer(fabric, model, stats, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(few, valid.subset([]), replace(cfg, epochs=1))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = Counter(
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )
    return {
        "batches": n_batches,
        "synchronizing calls in fit (set-up included)": sum(where.values()),
        "where (file:line: count)": dict(where.most_common(20)),
    }


def time_steps(step, steps: int, device, batch: int) -> tuple[float, float]:
    """(seconds of the first call, images/s over ``steps`` calls after it)."""
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    step()  # a second warm-up: cuDNN's algorithm choice, the allocator's pools
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return first, steps * batch / (time.perf_counter() - t0)


def loader_rate(trainer: Trainer, train: ShardedImages, cfg: StageConfig, stats) -> float:
    """Images/s of the training loader plus the batch augmentation on the device, in its
    second epoch (the first pays for starting the worker processes)."""
    f = trainer.fabric
    loader, _ = trainer.loaders(train, train, cfg)
    augment = BatchAugment(cfg.augmentation, stats.mean, stats.std)
    gen = torch.Generator(device=f.device).manual_seed(0)
    rate = 0.0
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        n, t0 = 0, time.perf_counter()
        for batch, _ in loader:
            augment(batch.to(f.device, non_blocking=True), train=True, generator=gen)
            n += batch.shape[0]
        sync(f.device)
        rate = n / (time.perf_counter() - t0)
    return rate


def peak_memory_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def check_stage(cfg, shards, checkpoint, runtime, plan, results) -> dict[str, Any]:
    """One stage three ways: as the pipeline runs it, the loop alone, the model step alone."""
    fabric = make_fabric(runtime)
    device = fabric.device
    bf16 = runtime.precision.startswith("bf16")
    train, valid = shards.split()
    out: dict[str, Any] = {"size": cfg.size, "batch": cfg.loader.batch_size}
    out["train images"], out["valid images"] = len(train), len(valid)

    reset_peak(device)
    t0 = time.perf_counter()
    result = train_in_fabric(checkpoint, shards, cfg, runtime)
    sync(device)
    out["stage wall (s)"] = round(time.perf_counter() - t0, 2)
    out["epoch seconds (train+valid)"] = [round(r["seconds"], 2) for r in result.history]
    out["peak GPU memory, stage (GiB)"] = peak_memory_gib(device)
    results["checkpoint"] = {
        **checkpoint,
        "model": result.state_dict,
        "optimizer": {"freeze": cfg.freeze, "state": result.optimizer_state},
    }

    model, stats = create_model(plan.arch, len(shards.classes), "none")
    trainer = Trainer(fabric, model, stats, progress=False)
    n_per_epoch = (len(train) // cfg.loader.batch_size) * cfg.loader.batch_size
    loop = trainer.fit(train, valid.subset([]), cfg)
    # the last epoch: the first pays for worker start-up and cuDNN's algorithm search
    loop_rate = n_per_epoch / loop.history[-1]["seconds"]
    out["loop alone (img/s)"] = round(loop_rate, 1)

    reset_peak(device)
    step = model_step(plan.arch, len(shards.classes), cfg, device, bf16)
    _, step_rate = time_steps(step, plan.steps, device, cfg.loader.batch_size)
    out["model step alone (img/s)"] = round(step_rate, 1)
    out["peak GPU memory, model step (GiB)"] = peak_memory_gib(device)
    out["loop / model step [target >= 0.95]"] = round(loop_rate / step_rate, 3)
    if device.type == "cuda":  # what cuDNN's autotuner would add (the project leaves it off)
        torch.backends.cudnn.benchmark = True
        try:
            step = model_step(plan.arch, len(shards.classes), cfg, device, bf16)
            _, tuned = time_steps(step, plan.steps, device, cfg.loader.batch_size)
        finally:
            torch.backends.cudnn.benchmark = False
        out["model step, cudnn.benchmark on (img/s)"] = round(tuned, 1)
    if device.type == "cuda":
        step = augmented_step(plan.arch, len(shards.classes), cfg, device, bf16, shards.size, stats)
        _, aug_rate = time_steps(step, plan.steps, device, cfg.loader.batch_size)
        out["augment + model step, no loader (img/s)"] = round(aug_rate, 1)
    rate = loader_rate(trainer, train, cfg, stats)
    out["loader + augment (img/s)"] = round(rate, 1)
    out["loader / model step [target >= 1]"] = round(rate / step_rate, 2)
    return out


def check_compile(cfg, n_classes, plan, device, bf16) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for on in (False, True):
        step = model_step(plan.arch, n_classes, cfg, device, bf16, compile_=on)
        first, rate = time_steps(step, plan.steps, device, cfg.loader.batch_size)
        key = "compiled" if on else "eager"
        out[f"{key}: first step (s)"] = round(first, 2)
        out[f"{key}: img/s"] = round(rate, 1)
    out["compiled / eager"] = round(out["compiled: img/s"] / out["eager: img/s"], 3)
    return out


def check_ddp(cfg, shards, checkpoint, runtime, single_rate: float) -> dict[str, Any]:
    n = torch.cuda.device_count() if runtime.accelerator == "cuda" else 2
    if n < 2:
        return {
            "skipped": f"{n} GPU present: DDP needs 2 or more (tests/vision/test_ddp.py "
            "checks devices=2 on the CPU)"
        }
    ddp = replace(runtime, devices=n)
    t0 = time.perf_counter()
    result = train_in_fabric(checkpoint, shards, cfg, ddp)
    wall = time.perf_counter() - t0
    train, _ = shards.split()
    rate = len(train) / result.history[-1]["seconds"]
    return {
        "devices": n,
        "stage wall (s)": round(wall, 2),
        "epoch seconds (train+valid)": [round(r["seconds"], 2) for r in result.history],
        "img/s (last epoch, train+valid)": round(rate, 1),
        "scaling vs one device": round(rate / single_rate, 2) if single_rate else None,
    }


def part(name: str, results: dict[str, Any], fn, *args) -> Any:
    """Run one part of the check; print and record its figures, or its error."""
    t0 = time.perf_counter()
    print(f"\n## {name}", flush=True)
    try:
        value = fn(*args)
    except Exception as e:  # report it and go on with the other parts
        traceback.print_exc()
        results.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
        return None
    figures = value[0] if isinstance(value, tuple) else value
    if isinstance(figures, dict):
        figures = {**figures, "part seconds": round(time.perf_counter() - t0, 1)}
        results[name] = figures
        print(json.dumps(figures, indent=2), flush=True)
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU: the code paths")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cassava-gpu-check"))
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    ap.add_argument("--images", type=int, default=None, help="stand-in size")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--data-only", action="store_true", help="the stand-in and the data half alone (prepare)"
    )
    args = ap.parse_args()
    plan = CPU_SMOKE if args.cpu_smoke else GPU
    plan = replace(plan, images=args.images or plan.images, epochs=args.epochs or plan.epochs)
    if plan.accelerator == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --cpu-smoke for the CPU smoke test", file=sys.stderr)
        return 2
    tune_malloc()  # as a run sets it (runtime.malloc: tuned)
    device = torch.device(plan.accelerator)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "plan": {k: v for k, v in plan.__dict__.items()},
    }
    print(f"# GPU check: {json.dumps({k: results[k] for k in ('when', 'machine', 'device')})}")
    raw = args.work / "raw"
    part("stand-in", results, stand_in, raw, plan.images)
    data = part("data half", results, data_half, raw, args.work, plan)
    if data is not None and not args.data_only:
        small, large = data[1]
        runtime = RuntimeConfig(
            accelerator=plan.accelerator, precision=plan.precision, progress=False
        )
        held = {"checkpoint": initial_checkpoint(plan.arch, list(small.classes))}
        configs = stages(plan)
        for cfg, shards in zip(configs, (small, large, large), strict=True):
            start = held["checkpoint"]
            part(f"stage {cfg.name}", results, check_stage, cfg, shards, start, runtime, plan, held)
        part("syncs", results, check_syncs, configs[1], large, plan, runtime)
        bf16 = plan.precision.startswith("bf16")
        if args.no_compile:
            results["torch.compile"] = {"skipped": "--no-compile"}
        else:
            part("torch.compile", results, check_compile, configs[0], 5, plan, device, bf16)
        single = results.get("stage frozen", {})
        rate = 0.0
        if single.get("epoch seconds (train+valid)"):
            rate = single["train images"] / single["epoch seconds (train+valid)"][-1]
        start = initial_checkpoint(plan.arch, list(small.classes))
        part("DDP", results, check_ddp, configs[0], small, start, runtime, rate)
    text = json.dumps(results, indent=2, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print("\n# summary")
    for name in ("stage frozen", "stage unfrozen", "stage mixup"):
        r = results.get(name, {})
        print(
            f"{name}: loop {r.get('loop alone (img/s)')} img/s, model step "
            f"{r.get('model step alone (img/s)')} img/s, ratio "
            f"{r.get('loop / model step [target >= 0.95]')}; loader "
            f"{r.get('loader + augment (img/s)')} img/s; peak "
            f"{r.get('peak GPU memory, stage (GiB)')} GiB"
        )
    for e in results.get("errors", []):
        print(f"ERROR {e}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
