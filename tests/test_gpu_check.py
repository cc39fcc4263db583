"""benchmarks/gpu_check.sh --cpu-smoke: the GPU check's code paths run to the end on a CPU, so
that a lent GPU's run is never the script's first."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.images import REPO


def smoke(work: Path, out: Path, *more: str) -> subprocess.CompletedProcess:
    command = ["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", "--no-compile", *more]
    return subprocess.run(
        [*command, "--work", str(work), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_gpu_check_smoke_runs_every_part(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    done = smoke(tmp_path / "work", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "errors" not in r and r["device"] == "cpu"
    assert r["stand-in"]["images"] == 40 and r["stand-in"]["drawn"]
    assert r["data half"]["presize 48, jpeg (img/s)"] > 0
    for name, size in (("frozen", 32), ("unfrozen", 48), ("mixup", 48)):
        s = r[f"stage {name}"]
        assert s["size"] == size and s["train images"] + s["valid images"] == 40
        assert len(s["epoch seconds (train+valid)"]) == 1
        for key in ("loop alone (img/s)", "model step alone (img/s)", "loader + augment (img/s)"):
            assert s[key] > 0, (name, key)
        ratio = s["loop alone (img/s)"] / s["model step alone (img/s)"]
        assert abs(s["loop / model step [target >= 0.95]"] - ratio) < 0.01
    assert r["torch.compile"] == {"skipped": "--no-compile"}
    assert r["syncs"]["skipped"].startswith("CUDA only")
    assert r["DDP"]["devices"] == 2 and r["DDP"]["img/s (last epoch, train+valid)"] > 0
    # a second run reuses the drawn stand-in and its shards (the data half alone, to be quick)
    again = smoke(tmp_path / "work", out, "--data-only")
    assert again.returncode == 0, again.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (
        r["stand-in"]["drawn"] is False and r["data half"]["presize 48, jpeg (img/s)"] == "reused"
    )
    assert "stage frozen" not in r and "DDP" not in r
