"""Hooks around kedro-mlflow's run (cassava_pipeline.hooks.mlflow_run), on throw-away stores."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from cassava_pipeline.config import LOADER_ARGS, ProjectConfigLoader
from cassava_pipeline.fallback import LOCAL_TRACKING_URI
from cassava_pipeline.hooks import TrackingHooks, mark_dead_runs_killed
from tests.images import REPO

DEAD = "http://127.0.0.1:9"


def _context(tmp_path, server: str):
    conf = tmp_path / "conf"
    for env in ("base", "local"):
        (conf / env).mkdir(parents=True)
    mlflow_yml = yaml.safe_load((REPO / "conf" / "base" / "mlflow.yml").read_text())
    mlflow_yml["server"]["mlflow_tracking_uri"] = server
    (conf / "base" / "mlflow.yml").write_text(yaml.safe_dump(mlflow_yml))
    (conf / "base" / "parameters.yml").write_text("runtime:\n  accelerator: cpu\n")
    loader = ProjectConfigLoader(str(conf), env="local", **LOADER_ARGS)
    return SimpleNamespace(config_loader=loader)


def test_a_server_in_mlflow_yml_is_mirrored_and_the_run_recorded_locally(tmp_path, caplog):
    context = _context(tmp_path, DEAD)
    hooks = TrackingHooks()
    with caplog.at_level(logging.WARNING, logger="cassava_pipeline"):
        hooks.after_context_created(context)
    server = context.config_loader["mlflow"]["server"]
    assert server["mlflow_tracking_uri"] == LOCAL_TRACKING_URI  # what kedro-mlflow now reads
    assert hooks._server == DEAD and hooks._gone  # mirrored there, known not to answer
    assert sum("does not answer" in r.message for r in caplog.records) == 1
    local = _context(tmp_path / "plain", "sqlite:///mlflow.db")
    plain = TrackingHooks()
    plain.after_context_created(local)
    assert plain._server is None
    assert local.config_loader["mlflow"]["server"]["mlflow_tracking_uri"] == "sqlite:///mlflow.db"


def test_runs_left_running_by_a_dead_process_of_this_host_are_marked_killed(store):
    _, exp = store
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    client = MlflowClient()
    left = client.create_run(exp, tags={"host": "h", "pid": dead.stdout.strip()})
    other_host = client.create_run(exp, tags={"host": "elsewhere", "pid": dead.stdout.strip()})
    with mlflow.start_run(experiment_id=exp) as current:
        assert mark_dead_runs_killed("h") == [left.info.run_id]
        assert mark_dead_runs_killed("h") == []  # once
    assert client.get_run(left.info.run_id).info.status == "KILLED"
    assert client.get_run(other_host.info.run_id).info.status == "RUNNING"
    assert client.get_run(current.info.run_id).info.status == "FINISHED"
