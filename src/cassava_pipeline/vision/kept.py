"""Earlier results kept beside the current one, keyed by what they were computed from.

Each training stage keeps one resume file and each presize folder one set of shards: the ones of
the configuration that ran last. Changing a setting and changing it back would compute both
again. So the result a new configuration replaces is moved, not deleted, into a ``kept/``
folder under the digest of its fingerprint; when a configuration comes back, its entry is moved
into place again and verified as any result is (its fingerprint, its sha256), as DVC's run cache
does for ``dvc repro``. :class:`KeepPolicy` bounds the folder: at most ``entries`` results and
``max_gib`` GiB together, the least recently used removed first.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import remove_path
from .options import STRICT, NonNegativeInt, PositiveFloat

logger = logging.getLogger(__name__)

KEPT_FOLDER = "kept"


@dataclass(frozen=True)
class KeepPolicy:
    """How many earlier results one output keeps, and how many bytes they may take."""

    __pydantic_config__ = STRICT

    entries: NonNegativeInt = 3  # earlier results kept per output; 0 keeps none (the old behaviour)
    max_gib: PositiveFloat = 8.0  # all of one output's kept results together

    @property
    def max_bytes(self) -> int:
        return int(self.max_gib * 2**30)


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


class Kept:
    """The ``kept/`` folder of one output: entries named by their fingerprint's digest."""

    def __init__(self, folder: Path, policy: KeepPolicy, suffix: str = "") -> None:
        self.folder, self.policy, self.suffix = Path(folder), policy, suffix

    def _entry(self, key: str) -> Path:
        return self.folder / f"{key}{self.suffix}"

    def entries(self) -> list[Path]:
        """The kept results, most recently used first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if not p.name.startswith(".")]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def store(self, result: Path, key: str) -> Path | None:
        """Move ``result`` (a file or a folder) here as ``key``; the oldest beyond the policy
        are removed. Returns where it went (None when the policy keeps nothing, or the result
        alone is over the size limit: then it is removed)."""
        if self.policy.entries <= 0 or _size(result) > self.policy.max_bytes:
            remove_path(result)
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = self._entry(key)
        if entry.exists():  # the same inputs kept before: the newer result replaces it
            remove_path(entry)
        os.replace(result, entry)
        now = time.time_ns()
        os.utime(entry, ns=(now, now))  # the least recently used go first
        self.prune()
        return entry

    def take(self, key: str) -> Path | None:
        """The entry kept for ``key``, if any (the caller moves it into place)."""
        entry = self._entry(key)
        return entry if entry.exists() else None

    def prune(self) -> list[Path]:
        """Remove the least recently used entries beyond ``entries`` or ``max_gib``."""
        removed: list[Path] = []
        total = 0
        for i, entry in enumerate(self.entries()):
            total += _size(entry)
            if i >= self.policy.entries or total > self.policy.max_bytes:
                remove_path(entry)
                removed.append(entry)
        if removed:
            logger.info(
                "kept results in %s: removed %d, the least recently used (at most %d, %.1f GiB)",
                self.folder,
                len(removed),
                self.policy.entries,
                self.policy.max_gib,
            )
        return removed
