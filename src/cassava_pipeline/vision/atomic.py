"""Temporary files of writes that never finished: named after their writer, removed once it is dead.

Every output is written to ``.<name>.tmp-<pid>`` (a file or a folder) next to it and renamed into
place when complete, so no reader ever sees half a file. A process killed mid-write (kill -9)
leaves that temporary behind; the next run removes every one whose process no longer exists
(:func:`remove_dead_temps_under`, when it starts), and so does the next writer of the same
output (:func:`remove_dead_temps`); both say so.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .parallel import pid_alive

logger = logging.getLogger(__name__)


def temp_path(target: Path, pid: int, kind: str = "tmp", *, keep_suffix: bool = False) -> Path:
    """Where ``target`` is written (``kind`` tmp) or moved aside (``old``) by process ``pid``;
    ``keep_suffix``: the name ends with ``target``'s suffix too (writers that pick the format
    from it: Pillow, Matplotlib)."""
    suffix = target.suffix if keep_suffix else ""
    return target.with_name(f".{target.name}.{kind}-{pid}{suffix}")


_TEMP = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:\.\w+)?$")


def _remove_if_dead(entry: Path, pattern: re.Pattern) -> bool:
    m = pattern.match(entry.name)
    if m is None or pid_alive(int(m.group(1))):
        return False
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
    return True


def _report(removed: list[Path], where: str) -> list[Path]:
    if removed:
        logger.warning(
            "removed %d temporary file(s) left by a run that died while writing %s: %s",
            len(removed),
            where,
            ", ".join(str(p) for p in removed),
        )
    return removed


def remove_dead_temps(target: Path) -> list[Path]:
    """Remove the temporaries of ``target`` left by processes that are gone; return them."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)(?:\.\w+)?$")
    if not target.parent.is_dir():
        return []
    removed = [e for e in target.parent.iterdir() if _remove_if_dead(e, pattern)]
    return _report(removed, str(target))


def remove_dead_temps_under(root: Path) -> list[Path]:
    """Remove every temporary under ``root`` left by a process that is gone; return them.

    Temporaries of live processes (a run of another environment, say) are left alone.
    """
    removed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            if name.startswith(".") and _remove_if_dead(here / name, _TEMP):
                removed.append((here / name).relative_to(root))
        dirnames[:] = [d for d in dirnames if (here / d).exists()]
    return _report(removed, str(root))


def write_atomic(
    path: Path, write: Callable[[BinaryIO], None], *, keep_previous: Path | None = None
) -> None:
    """Write ``path`` through a synced temporary sibling renamed into place, so a killed
    process never leaves half a file; ``keep_previous``: the file it replaces is renamed there
    first. Temporaries of dead writers of ``path`` are removed before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path)
    tmp = temp_path(path, os.getpid())
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Sync a folder, so that the renames in it reach the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
