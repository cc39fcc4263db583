"""What watching the tracking server costs a run: the failover's health checks.

    .venv/bin/python benchmarks/failover.py [--calls 300]

Starts ``mlflow server`` on loopback (SQLite backend, in a temporary folder), times
``cassava_pipeline.fallback.server_answers`` against it (the check made before each node, each
save to an MLflow dataset and at the end of a run) and against a port nobody listens on (a dead
server), counts the checks one ``kedro run --pipelines=cassava`` makes (its nodes plus the MLflow
datasets it saves, plus one), and prints their total against the demo's run time.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cassava_pipeline.fallback import server_answers
from cassava_pipeline.pipeline_registry import register_pipelines

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_call(uri: str, calls: int) -> float:
    for _ in range(20):
        server_answers(uri)
    start = time.perf_counter()
    for _ in range(calls):
        server_answers(uri)
    return (time.perf_counter() - start) / calls


def _checks_per_run() -> int:
    pipeline = register_pipelines()["cassava"]
    catalog = yaml.safe_load((REPO / "conf" / "base" / "catalog.yml").read_text())
    tracked = [n for n, e in catalog.items() if "Mlflow" in str(e.get("type", ""))]
    outputs = pipeline.all_outputs()
    saves = sum(
        1
        for out in outputs
        for name in tracked
        if out == name or ("{" in name and out.endswith(name.split("}")[-1]))
    )
    return len(pipeline.nodes) + saves + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument(
        "--run-seconds", type=float, default=108.0, help="the demo run it is set against"
    )
    args = p.parse_args()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
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
            live = _per_call(uri, args.calls)
        finally:
            server.terminate()
            server.wait()
    dead = _per_call(f"http://127.0.0.1:{_free_port()}", args.calls)
    checks = _checks_per_run()
    total = checks * live
    print(f"health check, live server on loopback: {live * 1000:.2f} ms per call")
    print(f"health check, nobody listening:        {dead * 1000:.2f} ms per call")
    print(f"checks in one --pipelines=cassava run:  {checks}")
    print(
        f"total per run: {total * 1000:.1f} ms = {100 * total / args.run_seconds:.3f}% of a "
        f"{args.run_seconds:.0f} s demo run"
    )


if __name__ == "__main__":
    main()
