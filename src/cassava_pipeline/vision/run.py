"""Run lr_find and training stages on Lightning Fabric: CPU or CUDA, precision, DDP.

``devices: N`` (N > 1) launches N processes from inside the calling process (``ddp_spawn``;
gloo on CPU, NCCL on CUDA) and returns rank 0's result. Under ``torchrun`` (several machines)
every process runs the stage itself in the process group of :mod:`.dist`, which Fabric finds
initialised; every rank returns rank 0's result (history and best epoch broadcast, the weights
equal on every rank by DDP). lr_find is a sweep of one process: under torchrun rank 0 runs it
and broadcasts its result, the others wait.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric

from . import allocator
from .dist import broadcast_from_zero, ensure_process_group, launched_by_torchrun, rank
from .learner import RuntimeConfig, StageConfig, StageResult, Trainer
from .models import Stats, create_model
from .schedule import LrFindOptions
from .shards import ShardedImages


def model_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[torch.nn.Sequential, Stats]:
    """Rebuild the model a checkpoint describes and load its weights (no download)."""
    model, _ = create_model(
        checkpoint["arch"],
        len(checkpoint["classes"]),
        "none",
        hidden=int(checkpoint["hidden"]),
        ps=float(checkpoint["ps"]),
        concat_pool=bool(checkpoint["concat_pool"]),
    )
    weights = [t for t in checkpoint["model"].values() if t.is_floating_point()]
    if weights and weights[0].dtype == torch.float64:  # trained with precision 64-true
        model.double()  # or loading would round the weights to float32 between stages
    model.load_state_dict(checkpoint["model"])
    return model, Stats(tuple(checkpoint["mean"]), tuple(checkpoint["std"]))


def inference_device(accelerator: str) -> torch.device:
    """Where a single-process prediction runs: CUDA when asked for (or auto) and present."""
    wants_cuda = accelerator in ("auto", "cuda", "gpu")
    return torch.device("cuda" if wants_cuda and torch.cuda.is_available() else "cpu")


def make_fabric(runtime: RuntimeConfig):
    """A Lightning Fabric for the runtime settings."""
    strategy = runtime.strategy
    if strategy == "auto" and runtime.devices * runtime.num_nodes > 1:
        strategy = "ddp" if launched_by_torchrun() else "ddp_spawn"
    if strategy == "ddp":
        ensure_process_group()  # Fabric uses it (gloo for CPU tensors, NCCL for CUDA ones)
    return Fabric(
        accelerator=runtime.accelerator,
        devices=runtime.devices,
        num_nodes=runtime.num_nodes,
        strategy=strategy,
        precision=runtime.precision,
    )


def _prepare_process(fabric, runtime: RuntimeConfig) -> None:
    """What each training process sets before it trains: glibc's malloc settings
    (``runtime.malloc``) and, for several processes on one CPU, their share of its cores."""
    allocator.apply(runtime.malloc)
    if fabric.device.type == "cpu" and fabric.world_size > 1:
        local = max(1, fabric.world_size // max(1, getattr(fabric, "num_nodes", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _train(
    fabric, *, checkpoint, shards, cfg, runtime, checkpoint_dir, result_path, on_epoch
) -> StageResult | None:
    carried = checkpoint.get("optimizer")  # the previous stage's AdamW state, if it kept one
    _prepare_process(fabric, runtime)
    model, stats = model_from_checkpoint(checkpoint)
    train, valid = shards.split()
    trainer = Trainer(fabric, model, stats, progress=runtime.progress, keep=runtime.keep)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    result = trainer.fit(
        train, valid, cfg, checkpoint_dir=ckpt, on_epoch=on_epoch, carried_optimizer=carried
    )
    if result_path is None:  # in this process (one device, or torchrun): returned
        return result
    if fabric.is_global_zero:
        # Through a file: a spawned process's return value goes through a pipe that the
        # launcher only reads after every process has exited, so a large one would deadlock.
        torch.save(asdict(result), result_path)
    return None


def train_in_fabric(
    checkpoint: dict[str, Any],
    shards: ShardedImages,
    cfg: StageConfig,
    runtime: RuntimeConfig,
    *,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> StageResult:
    """Train one stage from ``checkpoint`` on the shards' training side, validate on the rest.

    A ``checkpoint["optimizer"]`` (``{"freeze": ..., "state": ...}``, written by the previous
    stage) is the optimizer state the stage may go on from (``StageConfig.optimizer_state``).

    ``on_epoch`` (picklable: it may travel to spawned processes) gets each epoch's history row
    on rank 0, as soon as the epoch ends.
    """
    fabric = make_fabric(runtime)
    spawned = fabric.world_size > 1 and not launched_by_torchrun()  # ddp_spawn
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.pt" if spawned else None
        # A partial: Fabric's launcher walks positional arguments and chokes on frozen dataclasses.
        job = partial(
            _train,
            checkpoint=checkpoint,
            shards=shards,
            cfg=cfg,
            runtime=runtime,
            checkpoint_dir=checkpoint_dir,
            result_path=result_path,
            on_epoch=on_epoch,
        )
        result = fabric.launch(job)
        if result_path is not None:
            return StageResult(**torch.load(result_path, map_location="cpu", weights_only=True))
    # torchrun: every rank returns rank 0's record of the stage (its weights and optimizer state
    # are every rank's: DDP averages the gradients)
    local = ("state_dict", "optimizer_state")
    record = broadcast_from_zero({k: v for k, v in asdict(result).items() if k not in local})
    return StageResult(**record, **{k: getattr(result, k) for k in local})


def _lr_find(fabric, *, checkpoint, shards, cfg, options, runtime, cache_file) -> dict[str, Any]:
    _prepare_process(fabric, runtime)
    model, stats = model_from_checkpoint(checkpoint)
    train, _ = shards.split()
    trainer = Trainer(fabric, model, stats, progress=runtime.progress, keep=runtime.keep)
    return trainer.lr_find(train, cfg, options, cache_file=cache_file)


def lr_find_in_fabric(
    checkpoint: dict[str, Any],
    shards: ShardedImages,
    cfg: StageConfig,
    options: LrFindOptions,
    runtime: RuntimeConfig,
    *,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """fastai's lr_find for the model of ``checkpoint`` (always one process: it is a sweep).

    With ``cache_dir``, the sweep is stored in ``cache_dir/lr_find.json`` with the fingerprint
    of its inputs and reused while they are equal (:meth:`Trainer.lr_find`). Under torchrun,
    rank 0 sweeps (on its own device) and every rank gets its result.
    """
    if launched_by_torchrun():
        ensure_process_group()
        if rank() != 0:
            return broadcast_from_zero(None)
    single = RuntimeConfig(**{**runtime.__dict__, "devices": 1, "num_nodes": 1, "strategy": "auto"})
    fabric = make_fabric(single)
    job = partial(
        _lr_find,
        checkpoint=checkpoint,
        shards=shards,
        cfg=cfg,
        options=options,
        runtime=single,
        cache_file=Path(cache_dir) / "lr_find.json" if cache_dir is not None else None,
    )
    return broadcast_from_zero(fabric.launch(job))
