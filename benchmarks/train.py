"""Training-loop throughput against a bare PyTorch loop, loader against model, layouts and bf16.

    .venv/bin/python benchmarks/train.py [--arch resnet50 --size 224 --batch-size 64 --device cuda]

On the embedded sample's images (presized into a temporary shard set), with the same model,
batches and settings, in one run:

1. our training loop (``Trainer.fit``: Fabric, schedule, augmentation, checkpoint-free) against
   a bare PyTorch loop doing the same work (DataLoader, batch augmentation, forward, backward,
   AdamW step, one-cycle scheduler step); target: overhead at most 5%;
2. the data loader alone (crop + collate, and with the batch augmentation) against the model
   step alone (forward, backward, optimizer step on a fixed batch); target: loader >= 2x model;
3. the model step with channels-last and bf16 autocast on and off;
4. the fingerprint a stage computes before it starts (a digest of its starting weights, the
   shards' recorded digests, code digests): its time against one epoch of ours (target: at
   most 5%; it decides whether a resume file may be reused);
5. verification before use (issue 13): the shard set checked against its sha256s as in a
   fresh process, and a resume file loaded and checked against its sha256, each against one
   epoch of ours (target: at most 5% of the stage they guard; a stage has several epochs).
6. ``augment.resample`` (issue 28): ours and the loader with the batch augmentation with ``once``
   (one resample) beside the default ``twice`` (fastai's two), in the same rounds; ``twice``'s
   cost is the ratio of the two.
Each figure is the best of ``--rounds`` interleaved rounds. glibc's malloc is set as a run sets
it (``runtime.malloc: tuned``) for the whole process.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cassava_pipeline.vision import shards as shards_module
from cassava_pipeline.vision.allocator import tune_malloc
from cassava_pipeline.vision.augment import AugmentOptions, BatchAugment
from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.ingest import IngestOptions, ingest
from cassava_pipeline.vision.integrity import load_checkpoint
from cassava_pipeline.vision.layouts import CsvLayout
from cassava_pipeline.vision.learner import RuntimeConfig, StageConfig, Trainer, make_optimizer
from cassava_pipeline.vision.models import create_model, param_groups, unfreeze
from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions, write_shards
from cassava_pipeline.vision.run import make_fabric
from cassava_pipeline.vision.schedule import OneCycleScheduler, discriminative_lrs
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.split import SplitOptions, split

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "01_raw" / "cassava_sample"


def shards_for(tmp: Path, presize: int) -> ShardedImages:
    manifest, report = ingest(SAMPLE, CsvLayout(), IngestOptions())
    classes = [c["name"] for c in report["classes"]]
    manifest, _ = split(manifest, classes, SplitOptions())
    write_shards(
        PresizeJob(str(SAMPLE), manifest, tuple(classes), PresizeOptions(size=presize)),
        tmp / "shards",
    )
    return ShardedImages(tmp / "shards")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(model, stats, train, empty, cfg, fabric) -> float:
    trainer = Trainer(fabric, model, stats, progress=False)
    t0 = time.perf_counter()
    trainer.fit(train, empty, cfg)
    sync(fabric.device)
    return time.perf_counter() - t0


def bare(model, stats, train, cfg, fabric, bf16: bool) -> float:
    """The same work written as a plain loop: no Fabric, no callbacks, no bookkeeping."""
    device = fabric.device
    torch.manual_seed(cfg.seed)
    unfreeze(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    lrs = discriminative_lrs(cfg.lr, len(param_groups(model)))
    opt = make_optimizer(model, lrs, cfg)
    trainer = Trainer(fabric, model, stats, progress=False)
    loader, _ = trainer.loaders(train, train, cfg)
    sched = OneCycleScheduler(opt, cfg.epochs * len(loader), cfg.one_cycle)
    augment = BatchAugment(cfg.augmentation, stats.mean, stats.std)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            x = augment(images.to(device, non_blocking=True), train=True, generator=gen)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), labels.to(device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    sync(device)
    return time.perf_counter() - t0


def loader_alone(train, cfg, fabric, stats, with_augment: bool) -> tuple[float, int]:
    trainer = Trainer(fabric, torch.nn.Identity(), stats, progress=False)
    loader, _ = trainer.loaders(train, train, cfg)
    augment = BatchAugment(cfg.augmentation, stats.mean, stats.std)
    gen = torch.Generator(device=fabric.device).manual_seed(0)
    n = 0
    t0 = time.perf_counter()
    for batch, _ in loader:
        images = batch.to(fabric.device, non_blocking=True)
        if with_augment:
            augment(images, train=True, generator=gen)
        n += images.shape[0]
    sync(fabric.device)
    return time.perf_counter() - t0, n


def model_step(arch, n_classes, cfg, device, *, channels_last: bool, bf16: bool, compile=False):
    """One training step (forward, backward, AdamW step) of a fresh model on a fixed random
    batch of the stage's size; ``compile``: through ``torch.compile`` (benchmarks/compile.py)."""
    torch.manual_seed(0)
    model, _ = create_model(arch, n_classes, "none")
    model.to(device).train()
    x = torch.randn(cfg.loader.batch_size, 3, cfg.size, cfg.size, device=device)
    y = torch.randint(0, n_classes, (cfg.loader.batch_size,), device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = make_optimizer(model, [1e-4] * len(param_groups(model)), cfg)
    forward = torch.compile(model) if compile else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def model_alone(arch, n_classes, cfg, device, *, channels_last: bool, bf16: bool, steps: int):
    step = model_step(arch, n_classes, cfg, device, channels_last=channels_last, bf16=bf16)
    step()  # warm-up (allocations, cuDNN autotuning)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0, steps * cfg.loader.batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--presize", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=320, help="training images per epoch")
    args = ap.parse_args()
    tune_malloc()  # as a run sets it (runtime.malloc: tuned), for every loop measured here
    device = torch.device(args.device)
    print(
        f"# training benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or ''} "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    cfg = StageConfig(
        name="bench",
        epochs=1,
        lr=(1e-5, 1e-3),
        freeze=False,
        size=args.size,
        augment=AugmentOptions(min_scale=0.75),
        loader=LoaderOptions(batch_size=args.batch_size, num_workers=args.workers),
    )
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    fabric = make_fabric(
        RuntimeConfig(accelerator=device.type, precision=precision, progress=False)
    )
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = shards_for(Path(tmp), args.presize)
        train, valid = shards.split()
        train = train.subset(torch.arange(min(args.images, len(train))).numpy())
        empty = valid.subset([])
        n = (len(train) // args.batch_size) * args.batch_size
        ncls = len(shards.classes)
        best: dict[str, float] = {}

        def keep(name: str, seconds: float, images: int) -> None:
            best[name] = max(best.get(name, 0.0), images / seconds)

        once = replace(cfg, augment=replace(cfg.augment, resample="once"))
        for r in range(args.rounds):
            # Alternate which loop goes first: caches and allocators warm up for the second.
            loops = ("ours", "once", "bare")
            for which in loops if r % 2 == 0 else loops[::-1]:
                m, stats = create_model(args.arch, ncls, "none")
                if which == "ours":
                    keep("ours: Trainer.fit", ours(m, stats, train, empty, cfg, fabric), n)
                elif which == "once":
                    t = ours(m, stats, train, empty, once, fabric)
                    keep("ours: Trainer.fit, resample once", t, n)
                else:
                    t = bare(m, stats, train, cfg, fabric, precision != "32-true")
                    keep("bare PyTorch loop", t, n)
            m, stats = create_model(args.arch, ncls, "none")
            t0 = time.perf_counter()
            Trainer(fabric, m, stats, progress=False).fingerprint(train, cfg, cfg.lr)
            keep("stage fingerprint", time.perf_counter() - t0, 1)
            shards_module._VERIFIED.clear()  # as in a new process
            t0 = time.perf_counter()
            ShardedImages(shards.directory)
            keep("shard verification", time.perf_counter() - t0, 1)
            resume = Path(tmp) / "resume"
            if not (resume / "last.pt").exists():  # one epoch with a resume folder, once
                m, stats = create_model(args.arch, ncls, "none")
                Trainer(fabric, m, stats, progress=False).fit(
                    train, empty, cfg, checkpoint_dir=resume
                )
            t0 = time.perf_counter()
            load_checkpoint(resume / "last.pt", todo="")
            keep("resume file load + verification", time.perf_counter() - t0, 1)
            keep("loader alone (crop+collate)", *loader_alone(train, cfg, fabric, stats, False))
            keep("loader + batch augment", *loader_alone(train, cfg, fabric, stats, True))
            t, k = loader_alone(train, once, fabric, stats, True)
            keep("loader + batch augment, resample once", t, k)
            for cl in (True, False):
                for bf16 in (False, True):
                    name = f"model step, channels_last={cl}, bf16={bf16}"
                    # bf16 on a CPU without bf16 units is ~10x slower: fewer steps there
                    steps = 2 if bf16 and device.type == "cpu" else max(2, n // args.batch_size)
                    t, k = model_alone(
                        args.arch, ncls, cfg, device, channels_last=cl, bf16=bf16, steps=steps
                    )
                    keep(name, t, k)
        epoch_s = n / best["ours: Trainer.fit"]
        timed = {
            name: 1 / best.pop(name)
            for name in (
                "stage fingerprint",
                "shard verification",
                "resume file load + verification",
            )
        }
        res = {f"{k} (img/s)": round(v, 1) for k, v in best.items()}
        for name, seconds in timed.items():
            res[f"{name} (ms)"] = round(seconds * 1000, 1)
            res[f"{name} / one epoch of ours [target <= 0.05]"] = round(seconds / epoch_s, 4)
        res["shard set (MB)"] = round(
            sum(f.stat().st_size for f in shards.directory.glob("shard-*.bin")) / 1e6, 1
        )
        res["resume file (MB)"] = round((Path(tmp) / "resume" / "last.pt").stat().st_size / 1e6, 1)
        res["overhead of ours vs bare [target <= 5%]"] = (
            f"{(best['bare PyTorch loop'] / best['ours: Trainer.fit'] - 1) * 100:.1f}%"
        )
        res["resample twice (default) / once: ours' time"] = round(
            best["ours: Trainer.fit, resample once"] / best["ours: Trainer.fit"], 3
        )
        res["resample twice (default) / once: loader + augment time"] = round(
            best["loader + batch augment, resample once"] / best["loader + batch augment"], 3
        )
        model_key = f"model step, channels_last=True, bf16={device.type == 'cuda'}"
        res["loader + augment / model step [target >= 2]"] = round(
            best["loader + batch augment"] / best[model_key], 2
        )
        # issue 6 (on a GPU: resnet50, 224, bf16, channels_last): end-to-end training with our
        # loader on the presized shards against the model step alone on random tensors
        res["end-to-end / model step [target >= 0.9 on a GPU]"] = round(
            best["ours: Trainer.fit"] / best[model_key], 3
        )
    print(
        json.dumps(
            {
                "arch": args.arch,
                "size": args.size,
                "batch_size": args.batch_size,
                "images": n,
                **res,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
