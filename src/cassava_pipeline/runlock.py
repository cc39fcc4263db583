"""One ``kedro run`` at a time per project and environment.

Two runs in one project would read each other's half-finished outputs and resume each other's
checkpoints. The lock is an ``flock`` on ``.cassava-run-<env>.lock`` in the project root, which
the operating system releases when its holder dies, however it dies: a lock is never kept by a
dead process. The file also records the holder (pid, host, start time, command), so a refused
run names the one it waits for, and a run that takes over after a crash says whose lock it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class ProjectBusyError(RuntimeError):
    """Another run holds this project's lock for the same environment."""


def lock_path(project: Path, env: str) -> Path:
    """The lock file of a project and environment."""
    return Path(project) / f".cassava-run-{env}.lock"


class RunLock:
    """The lock of one project and environment; :meth:`acquire` refuses at once if it is held."""

    def __init__(self, project: Path, env: str):
        self.path, self.env = lock_path(project, env), env
        self._fh = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fh)
            fh.close()
            raise ProjectBusyError(
                f"Another run is using this project's {self.env!r} environment: "
                f"{_describe(holder)}. Wait for it to finish or stop it (kill "
                f"{holder.get('pid', '<pid>')}); two runs at once would read each other's "
                f"half-written outputs. (Lock file: {self.path})"
            ) from None
        previous = _read(fh)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            logger.warning(
                "took over the run lock %s: the run that held it, %s, ended without releasing "
                "it (killed?)",
                self.path.name,
                _describe(previous),
            )
        fh.seek(0)
        fh.truncate()
        json.dump(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": " ".join(sys.argv),
            },
            fh,
        )
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is None:
            return
        with contextlib.suppress(OSError):
            self._fh.seek(0)
            self._fh.truncate()  # a clean end: nothing to take over
            self._fh.flush()
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fh) -> dict[str, Any]:
    fh.seek(0)
    try:
        data = json.loads(fh.read() or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that left no record"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
        f"command `{holder.get('command')}`"
    )
