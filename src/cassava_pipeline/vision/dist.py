"""One ``torch.distributed`` process group for a job that ``torchrun`` started.

Under ``torchrun`` every process runs the whole ``kedro run``: the nodes, the catalog's loads and
saves. For the ranks to agree, they need a process group from the start, not only inside the
training stages: rank 0 writes a file, every rank waits at a barrier until it exists, and a
decision (the learning rate lr_find suggests, the resume file to use) is made once and
broadcast. :func:`ensure_process_group` creates it from torchrun's environment (gloo for CPU
tensors, NCCL for CUDA tensors when CUDA is present); Lightning Fabric finds it initialised and
uses it. Without torchrun (one process, or ``devices: N``, where Fabric spawns its own
processes) every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def ensure_process_group() -> bool:
    """Initialise the default process group from torchrun's environment (once); returns whether
    there is one to use."""
    if not launched_by_torchrun():
        return False
    if dist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return True


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def broadcast_from_zero(value: T) -> T:
    """Rank 0's ``value`` on every rank (no-op in a single process)."""
    if not _active():
        return value
    box: list[Any] = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank_zero(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 only, then a barrier, so that what it wrote exists for every rank when
    they go on. Returns ``fn()``'s value on rank 0, None elsewhere."""
    value = fn() if not _active() or dist.get_rank() == 0 else None
    barrier()
    return value


def end_process_group() -> None:
    """Wait for every rank, then tear the process group down (end of a run)."""
    if _active():
        dist.barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
