"""One run at a time per project and environment; a dead holder never keeps the lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cassava_pipeline.runlock import ProjectBusyError, RunLock, lock_path


def test_a_second_run_is_refused_and_told_who_holds_the_lock(tmp_path: Path):
    with RunLock(tmp_path, "local"):
        with pytest.raises(ProjectBusyError) as e:
            RunLock(tmp_path, "local").acquire()
        text = str(e.value)
        assert f"pid {os.getpid()}" in text and "command `" in text and "started 20" in text
        assert "'local' environment" in text and "kill" in text
        with RunLock(tmp_path, "kaggle"):  # another environment: its own lock
            pass
    with RunLock(tmp_path, "local"):  # released: free again
        pass
    assert lock_path(tmp_path, "local").read_text() == ""  # a clean end leaves no record


def test_the_lock_of_a_killed_run_is_taken_over_and_said_so(tmp_path: Path, caplog):
    script = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[2]);"
        "from pathlib import Path; from cassava_pipeline.runlock import RunLock;"
        "RunLock(Path(sys.argv[1]), 'local').acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), src], check=False)
    assert proc.returncode == -9
    record = json.loads(lock_path(tmp_path, "local").read_text())
    assert record["pid"] != os.getpid() and record["command"].startswith("-c")
    caplog.set_level("WARNING", logger="cassava_pipeline")
    with RunLock(tmp_path, "local"):  # the OS released the dead holder's flock
        pass
    assert f"the run that held it, pid {record['pid']}" in caplog.text
    assert "ended without releasing it" in caplog.text


def test_git_ignores_the_lock_files():
    """The lock file stays beside the project after a run (empty): git must not list it (an
    inline comment in .gitignore once made the pattern match nothing)."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for env in ("local", "kaggle"):
        name = lock_path(repo, env).relative_to(repo).as_posix()
        found = subprocess.run(["git", "check-ignore", "-q", name], cwd=repo, check=False)
        assert found.returncode == 0, f"{name} is not git-ignored"
