"""glibc malloc settings for training on a CPU.

PyTorch takes every CPU tensor from ``malloc``. glibc hands blocks over its mmap threshold to
the kernel on ``free`` and returns the top of its heap once more than the trim threshold lies
free there, so the activations of each step (tens of MB) are freed back to the kernel and
page-faulted in again, zeroed, on the next step. On the project's 2-core box a third of a
training stage's time went there (18.5 million minor faults in the benchmark's model-only loop;
RESULTS.md, "glibc's allocator"). Raising the mmap threshold to glibc's largest (32 MiB on
64-bit) and keeping up to 1 GiB of freed memory in the heap makes those blocks reused instead.

Blocks over that threshold (a 96-channel activation at 128 pixels and batch 32 is 48 MiB) would
still be mmap'd whenever the heap's top lacks room for them, and unmapped when freed. Once the
heap's free space is split up, that happens every step: glibc takes the mmap path instead of
growing the heap, so the top never grows and the faults never stop (37,000 a step, a frozen
epoch 1.3x slower, in one of several otherwise equal runs). ``M_MMAP_MAX = 0`` makes glibc grow
the heap instead, once, and reuse it from then on. Threads' own arenas still map blocks larger
than their 64 MiB heaps, as glibc does when it cannot grow them.

These are ``mallopt`` calls on the running process (the same settings as the
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_TOP_PAD_`` environment variables, which glibc only reads at start-up). Forked
DataLoader workers inherit them. The numbers do not change: PyTorch aligns every CPU tensor to
64 bytes wherever it lies. Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform
import typing
from typing import Literal

logger = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

# What ``tune_malloc`` sets: glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2), no
# mmap'd blocks at all in the main heap (blocks over the threshold come from the heap too), a
# trim threshold that keeps a training step's freed memory, and the heap grown in larger steps.
SETTINGS = {
    "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 32 * 1024 * 1024),
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 1024 * 1024 * 1024),
    "M_TOP_PAD": (M_TOP_PAD, 256 * 1024 * 1024),
}

Mode = Literal["tuned", "default"]  # runtime.malloc (RuntimeConfig)
MODES: tuple[str, ...] = typing.get_args(Mode)


@functools.cache
def tune_malloc() -> dict[str, int]:
    """Apply :data:`SETTINGS` to this process's glibc malloc, once; the settings glibc took
    (empty on another C library, or where glibc refused one)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    applied: dict[str, int] = {}
    for name, (param, value) in SETTINGS.items():
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[name] = value
        else:
            logger.warning("glibc refused mallopt(%s, %d); left as it was", name, value)
    return applied


def apply(mode: Mode) -> dict[str, int]:
    """``runtime.malloc``: ``tuned`` applies :func:`tune_malloc`, ``default`` leaves glibc as
    it is. Returns the settings in effect from this call (empty for ``default``)."""
    if mode not in MODES:
        raise ValueError(f"runtime.malloc: {mode!r} is not one of {', '.join(MODES)}")
    return tune_malloc() if mode == "tuned" else {}
