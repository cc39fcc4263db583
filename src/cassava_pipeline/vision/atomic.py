"""Temporary files of writes that never finished: named after their writer, removed once it is dead.

Every output is written to ``.<name>.tmp-<pid>`` (a file or a folder) next to it and renamed into
place when complete, so no reader ever sees half a file. A process killed mid-write (kill -9)
leaves that temporary behind; the next writer of the same output removes the ones whose process
no longer exists, and says so.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from .parallel import pid_alive

logger = logging.getLogger(__name__)


def temp_path(target: Path, pid: int, kind: str = "tmp") -> Path:
    """Where ``target`` is written (``kind`` tmp) or moved aside (``old``) by process ``pid``."""
    return target.with_name(f".{target.name}.{kind}-{pid}")


def remove_dead_temps(target: Path) -> list[Path]:
    """Remove the temporaries of ``target`` left by processes that are gone; return them."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        logger.warning(
            "removed %d temporary file(s) left by a run that died while writing %s: %s",
            len(removed),
            target,
            ", ".join(p.name for p in removed),
        )
    return removed
