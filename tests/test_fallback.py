"""The local store's mirror on a tracking server (cassava_pipeline.fallback).

The "server" of most tests is a second SQLite store: ``sync`` speaks to it through MLflow's
public client as to any server. The real HTTP server that dies mid-run is test_demo_run's.
"""

from __future__ import annotations

import inspect
import logging
import shutil

import mlflow
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from cassava_pipeline import fallback
from cassava_pipeline.fallback import (
    FALLBACK_FOR,
    FALLBACK_FROM,
    FALLBACK_WHERE,
    SYNCED_TO,
    Mirror,
    main,
    pending,
    server_answers,
    sync,
)
from tests.images import REPO

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """A local store with one run mirrored to a "server" store, and the two clients."""
    monkeypatch.chdir(tmp_path)
    local_uri, server_uri = (f"sqlite:///{tmp_path / n}.db" for n in ("local", "server"))
    local = MlflowClient(local_uri)
    exp = local.create_experiment("cassava", artifact_location=(tmp_path / "art").as_uri())
    local.set_experiment_tag(exp, "mlflow.experimentKind", "custom_model_development")
    run = local.create_run(exp, run_name="r", tags={FALLBACK_FROM: server_uri, FALLBACK_FOR: ""})
    rid = run.info.run_id
    local.log_batch(rid, params=[Param("frozen.train.epochs", "1")])
    local.log_batch(rid, metrics=[Metric("accuracy", 0.5, 1000, 0)])
    yield local_uri, server_uri, local, MlflowClient(server_uri), rid
    mlflow.set_tracking_uri(None)


def test_pushes_send_only_what_the_server_lacks_and_the_last_sends_the_whole_run(
    stores, tmp_path, monkeypatch
):
    local_uri, server_uri, local, server, rid = stores
    first = sync(local_uri, server_uri, local.get_run(rid), final=False)
    there = first.server_run_id
    assert local.get_run(rid).data.tags[FALLBACK_FOR] == there  # made on the first push
    assert server.get_experiment_by_name("cassava").tags["mlflow.experimentKind"]
    assert (first.params, first.metrics) == (1, 1)
    local.log_batch(rid, metrics=[Metric("accuracy", 0.75, 2000, 1)])
    (tmp_path / "report.json").write_text("{}")
    local.log_artifact(rid, str(tmp_path / "report.json"), "reporting")
    asked = []  # what a push with what it knows asks the server
    real = MlflowClient.get_metric_history
    monkeypatch.setattr(
        MlflowClient,
        "get_metric_history",
        lambda self, run_id, key: asked.append(run_id) or real(self, run_id, key),
    )
    second = sync(local_uri, server_uri, local.get_run(rid), final=False, known=first.known)
    assert there not in asked  # the server's history is known from the first push
    assert (second.server_run_id, second.params, second.metrics, second.artifacts) == (
        there, 0, 1, 0,
    )  # fmt: skip
    assert server.get_run(there).info.status == "RUNNING"  # not final: no status, no files
    local.set_terminated(rid, "FINISHED")
    last = sync(local_uri, server_uri, local.get_run(rid))
    assert (last.metrics, last.artifacts) == (0, 1)
    run = server.get_run(there)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert [(m.step, m.value) for m in server.get_metric_history(there, "accuracy")] == [
        (0, 0.5), (1, 0.75),
    ]  # fmt: skip
    assert [a.path for a in server.list_artifacts(there, "reporting")] == ["reporting/report.json"]
    assert local.get_run(rid).data.tags[SYNCED_TO] == f"{server_uri} {there}"
    assert pending(local_uri) == []  # a second sync sends nothing


def test_a_nested_runs_parent_is_made_on_the_server_first(stores):
    local_uri, server_uri, local, server, rid = stores
    exp = local.get_run(rid).info.experiment_id
    parent = local.create_run(exp, run_name="dvc repro", tags={FALLBACK_FROM: server_uri})
    local.set_tag(rid, "mlflow.parentRunId", parent.info.run_id)
    child = sync(local_uri, server_uri, local.get_run(rid), final=False).server_run_id
    parent_there = local.get_run(parent.info.run_id).data.tags[FALLBACK_FOR]
    assert server.get_run(child).data.tags["mlflow.parentRunId"] == parent_there
    assert server.get_run(parent_there).info.run_name == "dvc repro"


def test_a_server_that_does_not_answer_is_warned_of_once_and_never_called_again(
    stores, caplog, monkeypatch
):
    local_uri, _, local, _, rid = stores
    log = logging.getLogger("cassava_pipeline.fallback")
    monkeypatch.setattr(log, "handlers", [caplog.handler])  # Kedro's logging set-up may
    monkeypatch.setattr(log, "propagate", False)  # have replaced the root's handlers
    calls = []
    monkeypatch.setattr(fallback, "sync", lambda *a, **k: calls.append(a))
    mirror = Mirror(DEAD, rid, local_uri=local_uri)
    with caplog.at_level(logging.WARNING):
        assert not mirror.push("node frozen")
        assert not mirror.push("the end of the run", final=True)
    assert calls == [] and mirror.gone is not None
    (warning,) = [r.message for r in caplog.records if r.levelno >= logging.WARNING]
    assert "stopped answering" in warning and fallback.SYNC_COMMAND in warning
    assert local.get_run(rid).data.tags[FALLBACK_WHERE] == "node frozen"
    assert not server_answers(DEAD, timeout=1)


def test_a_server_that_answers_but_refuses_is_said_so(stores, caplog, monkeypatch):
    """A server whose /health answers and whose API turns every call down (credentials,
    permissions): one warning that says refused, and the run waits for sync as for an outage."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 403)
            self.end_headers()
            self.wfile.write(
                b"OK" if self.path == "/health" else b'{"error_code": "PERMISSION_DENIED"}'
            )

        do_POST = do_GET

        def log_message(self, *args):
            pass

    local_uri, _, local, _, rid = stores
    log = logging.getLogger("cassava_pipeline.fallback")
    monkeypatch.setattr(log, "handlers", [caplog.handler])
    monkeypatch.setattr(log, "propagate", False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        mirror = Mirror(uri, rid, local_uri=local_uri)
        with caplog.at_level(logging.WARNING):
            assert not mirror.push("the start")
            assert not mirror.push("node frozen")
    finally:
        server.shutdown()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "refused the run's records" in warnings[0] and "credentials" in warnings[0]
    assert local.get_run(rid).data.tags[FALLBACK_WHERE] == "the start"


def test_sync_command_without_a_server(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "conf", tmp_path / "conf", ignore=shutil.ignore_patterns("local"))
    monkeypatch.chdir(tmp_path)
    assert main(["sync"]) == 2  # no conf/local yet (make creates it)
    assert "conf/local" in capsys.readouterr().err
    (tmp_path / "conf" / "local").mkdir()
    assert main(["sync"]) == 2  # conf/base names the local store: nothing to send to
    assert "pass --to" in capsys.readouterr().err
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow caches stores by URI: no relative one
    assert main(["sync", "--to", DEAD, "--local", store]) == 0
    assert "nothing to send" in capsys.readouterr().out
    local = MlflowClient(store)
    exp = local.create_experiment("cassava_pipeline")
    run = local.create_run(exp, tags={FALLBACK_FROM: DEAD, FALLBACK_FOR: ""})
    local.set_terminated(run.info.run_id)
    assert main(["sync", "--to", DEAD, "--local", store]) == 1  # server down
    assert "1 run(s) wait" in capsys.readouterr().err


def test_the_public_mlflow_apis_the_mirror_relies_on():
    """What sync calls, by name and parameter: a release that renames one fails here, not in a
    user's run. Nothing private of MLflow or kedro-mlflow is used (grep finds no ``._``)."""
    wanted = {
        "create_experiment": ("name", "tags"),
        "create_run": ("experiment_id", "start_time", "tags"),
        "log_batch": ("run_id", "metrics", "params", "tags"),
        "get_metric_history": ("run_id", "key"),
        "set_terminated": ("run_id", "status", "end_time"),
        "set_tag": ("run_id", "key", "value"),
        "log_artifacts": ("run_id", "local_dir"),
        "list_artifacts": ("run_id",),
        "search_logged_models": ("experiment_ids",),
        "create_logged_model": (
            "experiment_id",
            "name",
            "source_run_id",
            "tags",
            "params",
            "model_type",
        ),
        "log_model_artifacts": ("model_id", "local_dir"),
        "finalize_logged_model": ("model_id", "status"),
        "search_model_versions": ("filter_string",),
        "create_model_version": ("name", "source", "run_id", "model_id"),
    }
    for name, params in wanted.items():
        signature = inspect.signature(getattr(MlflowClient, name))
        assert set(params) <= set(signature.parameters), name
    download = inspect.signature(mlflow.artifacts.download_artifacts).parameters
    assert {"run_id", "artifact_uri", "dst_path", "tracking_uri"} <= set(download)
    for path in sorted((REPO / "src" / "cassava_pipeline").rglob("*.py")):
        text = path.read_text()
        for private in ("fluent.", "_active_run_stack", "_mlflow_client", "_log_param",
                        "mlflow_hook.run_id", "_shutdown_event"):  # fmt: skip
            assert private not in text, (path.name, private)
