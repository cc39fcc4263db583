"""Temporary files of writes that never finished: named after their writer, removed once it is dead.

Every output is written to ``.<name>.tmp-<pid>`` (a file or a folder) next to it and renamed into
place when complete, so no reader ever sees half a file. A process killed mid-write (kill -9)
leaves that temporary behind; the next run removes every one whose process no longer exists
(:func:`remove_dead_temps_under`, when it starts), and so does the next writer of the same
output (:func:`remove_dead_temps`); both say so.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
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
    remove_path(entry)
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


class WriteError(RuntimeError):
    """An output could not be written for a reason of the machine's (a read-only folder, no
    permission, a full disk): the message names the output and what to do. The file or folder
    it would have replaced is as it was, and no temporary is left.

    Not an ``OSError``, so that code skipping unreadable inputs never takes it for one."""

    def __init__(self, message: str, target: Path, errno_: int) -> None:
        super().__init__(message)
        self.target, self.errno = target, errno_


_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def as_write_error(target: Path, error: OSError) -> WriteError | None:
    """The project's message for ``error`` met while writing ``target``, when it is one the
    user fixes on the machine; ``None`` for any other (a bug: its traceback is shown)."""
    folder = target.parent
    if error.errno in _FULL:
        todo = (
            f"Free space on that disk (df -h {folder}; the presized shards and checkpoints under "
            "data/ are the largest: du -sh data/*)"
        )
    elif error.errno in _NOT_WRITABLE:
        todo = (
            f"Make {folder} writable for this user (or run from a copy of the project that "
            "is), or point the outputs elsewhere in conf/<env>/catalog.yml"
        )
    else:
        return None
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(target) else ""
    message = (
        f"Could not write {target}: {error.strerror}{where}. {todo}, then run again. What was "
        "there before is unchanged and nothing half-written was left; stages that finished "
        "are reused."
    )
    return WriteError(message, target, error.errno)


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder with what it holds; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(target: Path, *temps: Path) -> Iterator[None]:
    """Around the writing of ``target`` through ``temps``: on any failure the temporaries are
    removed, and a failure of the machine's (read-only, full disk) is raised as a
    :class:`WriteError` that says what to do."""
    try:
        yield
    except BaseException as e:
        for tmp in temps:
            remove_path(tmp)
        if isinstance(e, OSError) and (error := as_write_error(target, e)) is not None:
            raise error from e
        raise


def install(tmp: Path, target: Path, *, previous: Path | None = None) -> bool:
    """Put a finished temporary (a file or a folder) in ``target``'s place: a file's bytes are
    synced first, the rename after it too, so that a crash leaves the old output or the new one,
    never half of either. ``previous``: the output it replaces is renamed there first (put back
    if the rename fails); returns whether there was one."""
    if tmp.is_file():
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    moved = previous is not None and target.exists()
    if moved:
        os.replace(target, previous)
    try:
        os.replace(tmp, target)
    except BaseException:
        if moved:  # the previous output back where it was
            os.replace(previous, target)
        raise
    fsync_dir(target.parent)
    return moved


def write_atomic(
    path: Path, write: Callable[[BinaryIO], None], *, keep_previous: Path | None = None
) -> None:
    """Write ``path`` through a temporary sibling put in place by :func:`install`, so a killed
    process never leaves half a file; ``keep_previous``: the file it replaces is renamed there
    first. Temporaries of dead writers of ``path`` are removed before. A write that fails leaves
    ``path`` as it was (:func:`writing`)."""
    tmp = temp_path(path, os.getpid())
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(path)
        with open(tmp, "wb") as fh:
            write(fh)
        install(tmp, path, previous=keep_previous)


def fsync_dir(folder: Path) -> None:
    """Sync a folder, so that the renames in it reach the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
