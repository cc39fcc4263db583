"""One ``torch.distributed`` process group for a job that ``torchrun`` started.

Under ``torchrun`` every process runs the whole ``kedro run``: the nodes, the catalog's loads and
saves. For the ranks to agree, they need a process group from the start, not only inside the
training stages: rank 0 writes a file, every rank waits at a barrier until it exists, and a
decision (the learning rate lr_find suggests, the resume file to use) is made once and
broadcast. :func:`ensure_process_group` creates it from torchrun's environment (gloo for CPU
tensors, NCCL for CUDA tensors when CUDA is present); Lightning Fabric finds it initialised and
uses it. Without torchrun (one process, or ``devices: N``, where Fabric spawns its own
processes) every function here is a no-op.

A rank that fails says so before it exits (:func:`report_failure`): in the store torchrun's
agent keeps for the job (it outlives the workers) and in torchrun's own error file, so that
torchrun's summary shows its traceback. The other ranks stop at their next collective (gloo and
NCCL see the peer gone) or by the agent's SIGTERM, and :func:`failure_elsewhere` tells them
which rank failed first and why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
logger = logging.getLogger(__name__)
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


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
    # Long: the others wait at barriers while rank 0 alone presizes or sweeps lr_find. A rank
    # that dies ends the others at once all the same (its connections close).
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
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


# ---- a failure on one rank, known to the others ---------------------------------------------


def _failure_key() -> str:
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"cassava/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/failed"


def _store() -> dist.TCPStore | None:
    """A client of the store torchrun's agent keeps (``MASTER_ADDR:MASTER_PORT``)."""
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=5),
        )
    except (KeyError, ValueError, RuntimeError) as e:
        logger.debug("torchrun's store cannot be reached: %s", e)
        return None


def report_failure(error: BaseException) -> str | None:
    """Record that this rank failed, with ``error`` (first failure only); returns the line
    recorded, or None outside torchrun."""
    if not launched_by_torchrun():
        return None
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler  # noqa: PLC0415

    line = f"rank {rank()} ({os.uname().nodename}): {type(error).__name__}: {error}"[:2000]
    ErrorHandler().record_exception(error)  # torchrun's summary shows it as the root cause
    store = _store()
    if store is not None:
        try:
            store.compare_set(_failure_key(), "", line)  # the first failure wins
        except RuntimeError as e:
            logger.debug("could not record the failure in torchrun's store: %s", e)
    return line


def failure_elsewhere() -> str | None:
    """What another rank recorded when it failed first (see :func:`report_failure`), or None."""
    if not launched_by_torchrun():
        return None
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([_failure_key()]):
            return None
        line = store.get(_failure_key()).decode(errors="replace")
    except RuntimeError:
        return None
    return None if line.startswith(f"rank {rank()} ") else line
