"""What mirroring a run to a tracking server costs it (cassava_pipeline.fallback).

    .venv/bin/python benchmarks/mirror.py [--repeats 5]

Starts ``mlflow server`` on loopback (SQLite backend, in a temporary folder), records in a local
store a run shaped as the demo's (its parameters, 4 epoch metrics over 3 epochs), and times
``Mirror.push`` against the server: the first push (the server run made, every parameter sent),
a push after one more epoch (what the epoch logger and each node end send), and the final push
(artifacts, status). It counts the pushes one ``kedro run --pipelines=cassava`` makes (start,
each node, each epoch, end) and prints their total against the demo's run time; and the same
push against a port nobody listens on (the health check alone: a dead server is given up).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from cassava_pipeline.dvc_runs import flatten
from cassava_pipeline.fallback import FALLBACK_FOR, FALLBACK_FROM, Mirror, server_answers
from cassava_pipeline.pipeline_registry import register_pipelines
from cassava_pipeline.tracking import EPOCH_METRICS

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_params() -> dict[str, str]:
    """The demo run's parameters as kedro-mlflow logs them (flattened, dotted)."""

    params: dict = {}
    for f in sorted((REPO / "conf" / "base").glob("parameters*.yml")):
        params.update(yaml.safe_load(f.read_text()) or {})
    params = {k: v for k, v in params.items() if not k.startswith("_")}
    return flatten(params)


def _pushes_per_run() -> int:
    pipeline = register_pipelines()["cassava"]
    stages = yaml.safe_load((REPO / "conf" / "base" / "parameters_train.yml").read_text())
    epochs = sum(int(stages[s]["train"]["epochs"]) for s in ("frozen", "unfrozen", "mixup"))
    return 1 + len(pipeline.nodes) + epochs + 1


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--run-seconds", type=float, default=108.0, help="the demo run it is set against"
    )
    args = p.parse_args()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    params = _demo_params()
    first, epoch, final = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server",
             "--backend-store-uri", f"sqlite:///{tmp}/server.db",
             "--artifacts-destination", f"{tmp}/artifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": str(Path(sys.executable).parent)},  # noqa: E501
        )  # fmt: skip
        try:
            deadline = time.time() + 120
            while time.time() < deadline and not server_answers(uri, timeout=1):
                time.sleep(0.5)
            local_uri = f"sqlite:///{tmp}/local.db"
            local = MlflowClient(local_uri)
            exp = local.create_experiment("mirror", artifact_location=f"{tmp}/local-artifacts")
            (Path(tmp) / "metrics.json").write_text("{}")
            for r in range(args.repeats):
                run = local.create_run(exp, tags={FALLBACK_FROM: uri, FALLBACK_FOR: ""})
                rid = run.info.run_id
                items = [Param(k, v) for k, v in params.items()]
                for i in range(0, len(items), 100):
                    local.log_batch(rid, params=items[i : i + 100])
                rows = lambda e, r=r: [Metric(k, 0.5, 1000 * e + r, e) for k in EPOCH_METRICS]  # noqa: E731
                for e in range(3):
                    local.log_batch(rid, metrics=rows(e))
                mirror = Mirror(uri, rid, local_uri=local_uri)
                first.append(_timed(lambda m=mirror: m.push("the start")))
                local.log_batch(rid, metrics=rows(3))
                epoch.append(_timed(lambda m=mirror: m.push("an epoch")))
                local.log_artifact(rid, str(Path(tmp) / "metrics.json"), "reporting")
                local.set_terminated(rid)
                final.append(_timed(lambda m=mirror: m.push("the end", final=True)))
                assert mirror.gone is None, mirror.gone
        finally:
            server.terminate()
            server.wait()
    dead = Mirror(f"http://127.0.0.1:{_free_port()}", "none", local_uri="sqlite:///:memory:")
    dead_s = _timed(lambda: server_answers(dead.server_uri))
    pushes = _pushes_per_run()
    med = statistics.median
    total = med(first) + (pushes - 2) * med(epoch) + med(final)
    print(f"parameters per run: {len(params)}; pushes per --pipelines=cassava run: {pushes}")
    print(
        f"first push (server run made, every parameter): {med(first) * 1000:.0f} ms "
        f"(median of {args.repeats} runs)"
    )
    print(f"push after an epoch or node:                   {med(epoch) * 1000:.0f} ms")
    print(f"final push (artifact, status):                 {med(final) * 1000:.0f} ms")
    print(f"health check of a dead server (then no calls):  {dead_s * 1000:.1f} ms")
    print(
        f"total per run: {total:.2f} s = {100 * total / args.run_seconds:.2f}% of a "
        f"{args.run_seconds:.0f} s demo run"
    )


if __name__ == "__main__":
    main()
