"""The torchrun path, as the README runs it, on CPU with gloo and the shrunk sample.

Two "machines" on one box (two ``torchrun --nnodes=2`` processes started side by side), and one
machine with two processes (``--nproc-per-node=2``), each running ``kedro run --pipelines=train``
in the same project, against ``runtime.devices=2`` (Fabric's ``ddp_spawn`` from inside the node)
with the same seed: the same weights, bit for bit, one MLflow run, rank 0 alone writing files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests import servers
from tests.test_demo_run import ENV, _kedro, _project

TORCHRUN = Path(sys.executable).parent / "torchrun"
STAGES = ("frozen", "unfrozen", "mixup")


@pytest.fixture(scope="module")
def data_ready(tmp_path_factory) -> Path:
    """A project with the shrunk sample drawn and its data half (ingest, split, presize) run."""
    root = _project(tmp_path_factory.mktemp("torchrun"))
    _kedro(root, "run", "--pipelines=sample_data")
    _kedro(root, "run", "--pipelines=data")
    return root


def _copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("mlflow.db", "mlruns", "*.log"))
    return dest


def _weights(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    models = root / "data" / "06_models"
    return {s: torch.load(models / f"{s}.pt", weights_only=True)["model"] for s in STAGES}


def _same(a: dict, b: dict) -> bool:
    return all(
        a[s].keys() == b[s].keys() and all(torch.equal(a[s][k], b[s][k]) for k in a[s])
        for s in STAGES
    )


def _torchrun(
    root: Path,
    nnodes: int,
    nproc: int,
    params: str | list[str],
    pipeline: str = "--pipelines=train",
) -> list[subprocess.Popen]:
    """The README's command, one per node (``params``: theirs, or one for all), started side
    by side on 127.0.0.1."""
    port = servers.free_port()
    procs = []
    for node in range(nnodes):
        own = params[node] if isinstance(params, list) else params
        command = [
            str(TORCHRUN), f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
            "-m", "kedro", "run", pipeline, f"--params={own}",
        ]  # fmt: skip
        log = open(root / f"node{node}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(command, cwd=root, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        )
    return procs


def _wait(procs: list[subprocess.Popen], root: Path, timeout: float = 600) -> list[int]:
    codes = []
    for i, p in enumerate(procs):
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError((root / f"node{i}.log").read_text()[-4000:]) from None
    return codes


def _runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cassava_pipeline")
    return client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def spawned(data_ready, tmp_path_factory) -> Path:
    """The same training with ``runtime.devices=2``: Fabric spawns the two processes."""
    root = _copy(data_ready, tmp_path_factory.mktemp("spawn") / "project")
    _kedro(root, "run", "--pipelines=train", "--params=runtime.devices=2")
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nnodes", "nproc", "params", "pipeline"),
    [
        (2, 1, "runtime.devices=1,runtime.num_nodes=2", "--pipelines=train"),
        (1, 2, "runtime.devices=2", "--pipelines=cassava"),  # the data half again, and evaluate
    ],
    ids=["two-machines-train", "one-machine-two-processes-cassava"],
)
def test_torchrun_trains_like_devices_2(
    data_ready, spawned, tmp_path, nnodes, nproc, params, pipeline
):
    root = _copy(data_ready, tmp_path / "project")
    codes = _wait(_torchrun(root, nnodes, nproc, params, pipeline), root)
    logs = "".join((root / f"node{i}.log").read_text() for i in range(nnodes))
    assert codes == [0] * nnodes, logs[-4000:]
    assert _same(_weights(root), _weights(spawned))  # bit for bit
    model = Path("data") / "06_models" / "model.safetensors"  # one model, written by rank 0
    assert (root / model).read_bytes() == (spawned / model).read_bytes()
    assert not [p for p in (root / "data").rglob(".*") if ".tmp-" in p.name]  # no debris
    (run,) = _runs(root)  # one MLflow run, rank 0's
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")]
    assert steps == [0, 1, 2]
    (spawn_run,) = _runs(spawned)
    assert run.data.metrics["accuracy"] == spawn_run.data.metrics["accuracy"]
    for stage in STAGES:  # the histories rank 0 wrote are those of the spawned run
        a, b = (pd.read_csv(r / "data" / "08_reporting" / f"history_{stage}.csv")
                for r in (root, spawned))  # fmt: skip
        assert a.drop(columns="seconds").equals(b.drop(columns="seconds"))
    assert "Traceback" not in logs
    if pipeline == "--pipelines=cassava":  # rank 0 wrote the evaluation once
        assert json.loads((root / "data" / "08_reporting" / "metrics.json").read_text())
        assert run.data.metrics["final_metrics.tta_accuracy"] >= 0


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank_and_the_run_is_failed(data_ready, tmp_path):
    """The second machine is misconfigured (an accelerator it does not have): it fails when the
    frozen stage starts; the first machine stops at its next collective instead of hanging, says
    which rank failed first, and its MLflow run is FAILED with that rank and error as tags."""
    import time

    root = _copy(data_ready, tmp_path / "project")
    params = "runtime.devices=1,runtime.num_nodes=2"
    start = time.monotonic()
    codes = _wait(_torchrun(root, 2, 1, [params, f"{params},runtime.accelerator=tpu"]), root, 300)
    elapsed = time.monotonic() - start
    first, second = ((root / f"node{i}.log").read_text() for i in range(2))
    assert codes[0] != 0 and codes[1] != 0, first[-3000:] + second[-3000:]
    assert elapsed < 240, f"{elapsed:.0f} s"
    # torchrun's summary names the root cause, with the traceback from the error file we wrote
    assert re.search(r"Root Cause[^\n]*\n.*\n.*\n.*\n\s+rank\s+: 1 ", second), second[-3000:]
    assert "traceback : Traceback" in second and "torch_xla" in second
    assert "rank 1 (" in first and "failed first" in first, first[-3000:]
    (run,) = _runs(root)
    assert run.info.status == "FAILED"
    assert run.data.tags["failed_rank"] == "1" and "torch_xla" in run.data.tags["failure"]
