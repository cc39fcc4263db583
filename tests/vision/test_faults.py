"""kill -9 mid-write: no worker outlives its parent, no temporary file outlives the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cassava_pipeline.datasets import CheckpointDataset, ImageShardsDataset
from cassava_pipeline.vision.ingest import IngestOptions, ingest
from cassava_pipeline.vision.layouts import FolderLayout
from cassava_pipeline.vision.parallel import pid_alive
from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions
from tests.images import REPO
from tests.training import coloured_images

SLOW_PRESIZE = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {src!r})
    import pandas as pd
    from cassava_pipeline.datasets import ImageShardsDataset
    from cassava_pipeline.vision import presize
    from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions
    real = presize._presize_one
    def slow(*args):  # about 60 s in all: long enough to be killed in the middle
        time.sleep(0.5)
        return real(*args)
    presize._presize_one = slow  # the forked workers inherit it
    manifest = pd.read_parquet({manifest!r})
    job = PresizeJob({root!r}, manifest, ("blue", "green", "red"),
                     PresizeOptions(size=32, workers=2, chunk_size=1))
    ImageShardsDataset(path={out!r}).save(job)
    """
)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_kill_9_during_presize_leaves_no_worker_and_no_folder_after_the_rerun(
    tmp_path: Path, caplog
):
    root = coloured_images(tmp_path / "raw", per_class=40)
    manifest, _ = ingest(root, FolderLayout(), IngestOptions(workers=1))
    manifest["is_valid"] = False
    manifest.to_parquet(tmp_path / "manifest.parquet")
    out = tmp_path / "data" / "presized_small"
    script = SLOW_PRESIZE.format(
        repo=str(REPO),
        src=str(REPO / "src"),
        manifest=str(tmp_path / "manifest.parquet"),
        root=str(root),
        out=str(out),
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            workers = _children(proc.pid)
            temps = (
                [p for p in out.parent.glob(".presized_small.tmp-*")] if out.parent.exists() else []
            )
            if len(workers) >= 2 and temps and list(temps[0].glob("shard-*.bin")):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the presize never got under way")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.time() + 10  # the workers notice their parent is gone within a second
    while time.time() < deadline and any(pid_alive(w) for w in workers):
        time.sleep(0.2)
    assert not [w for w in workers if pid_alive(w)], "orphaned presize workers"
    assert [p.name for p in out.parent.iterdir()] == [f".presized_small.tmp-{proc.pid}"]

    caplog.set_level("WARNING", logger="cassava_pipeline")
    job = PresizeJob(str(root), manifest, ("blue", "green", "red"), PresizeOptions(32, workers=1))
    ImageShardsDataset(path=str(out)).save(job)
    assert sorted(p.name for p in out.parent.iterdir()) == ["presized_small"]
    assert f".presized_small.tmp-{proc.pid}" in caplog.text and "died while writing" in caplog.text
    assert len(ImageShardsDataset(path=str(out)).load()) == 120


KILLED_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {src!r})
    from cassava_pipeline.datasets import checkpoint
    def die_halfway(fh):
        fh.write(b"half a checkpoint")
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.write_atomic_rank0(checkpoint.Path({path!r}), die_halfway)
    """
)


def test_kill_9_during_a_checkpoint_write_leaves_the_old_file_and_no_debris(tmp_path: Path):
    path = tmp_path / "frozen.pt"
    ds = CheckpointDataset(path=str(path))
    ds.save({"model": {"w": torch.ones(3)}, "stage": "old"})
    script = KILLED_WRITE.format(src=str(REPO / "src"), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script])
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert (tmp_path / f".frozen.pt.tmp-{proc.pid}").read_bytes() == b"half a checkpoint"
    assert ds.load()["stage"] == "old"  # readers never saw the torn write
    ds.save({"model": {"w": torch.zeros(3)}, "stage": "new"})  # the next write cleans up
    assert sorted(os.listdir(tmp_path)) == ["frozen.pt"]
    assert ds.load()["stage"] == "new"


def test_the_next_start_removes_what_dead_runs_left_and_spares_live_ones(tmp_path: Path, caplog):
    from cassava_pipeline.vision.atomic import remove_dead_temps_under

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    models = tmp_path / "06_models" / "resume" / "mixup"
    models.mkdir(parents=True)
    (models / f".last.pt.tmp-{dead.pid}").write_bytes(b"torn")
    shards = tmp_path / "05_model_input" / f".presized_large.tmp-{dead.pid}"
    shards.mkdir(parents=True)
    (shards / "shard-00000.bin").write_bytes(b"half")
    live = tmp_path / "08_reporting" / f".metrics.json.tmp-{os.getpid()}"  # a run still writing
    live.parent.mkdir(parents=True)
    live.write_text("{")
    (tmp_path / "08_reporting" / "metrics.json").write_text("{}")
    caplog.set_level("WARNING", logger="cassava_pipeline")
    removed = remove_dead_temps_under(tmp_path)
    assert sorted(map(str, removed)) == [
        f"05_model_input/.presized_large.tmp-{dead.pid}",
        f"06_models/resume/mixup/.last.pt.tmp-{dead.pid}",
    ]
    assert (
        not shards.exists() and live.exists() and (tmp_path / "08_reporting/metrics.json").exists()
    )
    assert "died while writing" in caplog.text
