"""Process-parallel map over chunks of work, in order, with a bounded number of chunks in flight."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: int | None) -> int:
    """``0`` or ``None`` means every core this process may use."""
    if workers is None or workers <= 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return workers


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Split ``items`` into consecutive chunks of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """Exit this worker as soon as ``parent`` is gone (killed with -9, say): a pool worker
    blocked on its task queue would otherwise wait forever, holding its memory."""
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(parent: int) -> None:
    # One thread per worker: the pool already uses every core, and torch's own thread pool
    # would oversubscribe them (and must not run OpenMP regions inherited through fork).
    torch = sys.modules.get("torch")  # only if the parent uses it: importing it costs seconds
    if torch is not None:
        torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def ordered_map(
    fn: Callable[[T], R], chunks: Iterable[T], *, workers: int, max_in_flight: int | None = None
) -> Iterator[R]:
    """Yield ``fn(chunk)`` for each chunk, in input order.

    With ``workers == 1`` everything runs in this process (no pickling, easy to debug and to
    profile). Otherwise at most ``max_in_flight`` chunks (default 2 per worker) are submitted at
    once, so memory does not grow with the number of chunks.
    """
    if workers <= 1:
        for chunk in chunks:
            yield fn(chunk)
        return
    limit = max_in_flight or 2 * workers
    # fork: workers start in milliseconds and inherit imports; see _init_worker for torch.
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)
    ) as pool:
        pending: deque[Future[R]] = deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
