"""When the tracking server stops answering: the local fallback store, and the way back.

A long training run must not fail, nor wait minutes on HTTP retries, because the MLflow server
went away after it started. :class:`Failover` is armed by the project's hooks when a run starts
on an ``http(s)`` server. It checks the server (its ``/health``, 3 s at most) before each node,
before each save to an MLflow dataset, on pipeline end and error, and whenever the epoch logger
gets no answer. The first time the server does not answer, it moves the run, once, to the local
store ``sqlite:///mlflow.db``:

- the server's run is left as it is (the server cannot hear anything) and dropped from MLflow's
  active-run stack, its system-metrics thread stopped;
- a local run is started in an experiment of the same name, with the server run's tags, the
  parameters logged so far, and ``cassava.fallback_for`` / ``cassava.fallback_from`` naming
  the server run and the server; kedro-mlflow's hook is pointed at it, so the rest of the run
  (node parameters, metric and artifact datasets, the model, the final status) lands there;
- one warning says so, with the command that sends the local run back.

The run goes on and ends as it would have; checkpoints and every local output are unaffected.
While armed, MLflow's HTTP client retries once (``MLFLOW_HTTP_REQUEST_*``, unless the user set
them), and the retry and system-metrics warnings of a server that is gone are kept out of the
log at DEBUG: the one warning says everything.

``python -m cassava_pipeline.fallback sync`` copies every local run that fell back (also those
that started while the server was down) into the server once it answers again: parameters,
tags, metric histories, artifacts and logged models, then the final status. It is idempotent:
what the server run has already is not sent twice, and a synced run is tagged
``cassava.synced_to``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.tracking import MlflowClient, fluent

logger = logging.getLogger(__name__)

LOCAL_TRACKING_URI = "sqlite:///mlflow.db"
FALLBACK_FOR = "cassava.fallback_for"  # the server run this local run continues ("" if none)
FALLBACK_FROM = "cassava.fallback_from"  # the server the run could not reach
FALLBACK_WHERE = "cassava.fallback_at"  # where the run was when the server went away
SYNCED_TO = "cassava.synced_to"  # "<server uri> <run id>" once sent back
SYNCED_MODEL = "cassava.synced_from_model"  # on a server's logged model: the local model id
SYNC_COMMAND = "python -m cassava_pipeline.fallback sync"

# While armed: one retry, no long back-off (a dead server is failed over, not waited for).
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
# What MLflow and urllib3 log about a server that is gone, once per call or per thread.
_QUIET = {
    "urllib3.connectionpool": ("Retrying",),
    "mlflow.system_metrics.system_metrics_monitor": (
        "Failed to get mlflow run",
        "Failed to log system metrics",
    ),
}


def is_remote(uri: str) -> bool:
    return str(uri).startswith(("http://", "https://"))


def server_answers(uri: str, timeout: float = 3.0) -> bool:
    """Whether an MLflow tracking server answers its health check."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class _Demote(logging.Filter):
    """Lowers the records of a server that is gone to DEBUG (the failover warns once)."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.prefixes):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


@dataclass
class Failover:
    """The armed failover of one ``kedro run`` (see the module docstring)."""

    server_uri: str
    run_id: str
    experiment_name: str
    run_name: str
    tags: dict[str, str]
    local_run_id: str | None = None
    _params: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _env: dict[str, str | None] = field(default_factory=dict)
    _filters: list[tuple[logging.Logger, logging.Filter]] = field(default_factory=list)

    # ---- arming -----------------------------------------------------------------------------
    @classmethod
    def for_active_run(cls) -> Failover | None:
        """Arm for MLflow's active run when it lives on an ``http(s)`` server."""
        run = mlflow.active_run()
        uri = mlflow.get_tracking_uri()
        if run is None or not is_remote(uri):
            return None
        try:
            data = MlflowClient(uri).get_run(run.info.run_id)
            experiment = mlflow.get_experiment(data.info.experiment_id).name
        except Exception as e:  # the server went away already: fail over at the next check
            logger.debug("could not read run %s from %s: %s", run.info.run_id, uri, e)
            data, experiment = None, os.environ.get("MLFLOW_EXPERIMENT_NAME", "Default")
        tags = dict(data.data.tags) if data is not None else {}
        name = data.info.run_name if data is not None else run.info.run_name
        failover = cls(uri, run.info.run_id, experiment, name or "", tags)
        failover._arm()
        return failover

    def _arm(self) -> None:
        global _ACTIVE  # noqa: PLW0603 - one armed failover per process
        for key, value in HTTP_ENV.items():
            if key not in os.environ:
                self._env[key] = None
                os.environ[key] = value
        for name, prefixes in _QUIET.items():
            log, demote = logging.getLogger(name), _Demote(prefixes)
            log.addFilter(demote)
            self._filters.append((log, demote))
        _ACTIVE = self

    def disarm(self) -> None:
        global _ACTIVE  # noqa: PLW0603 - one armed failover per process
        for key in self._env:
            os.environ.pop(key, None)
        self._env.clear()
        for log, demote in self._filters:
            log.removeFilter(demote)
        self._filters.clear()
        if _ACTIVE is self:
            _ACTIVE = None

    # ---- what the run does while armed --------------------------------------------------------
    @property
    def failed_over(self) -> bool:
        return self.local_run_id is not None

    def remember_params(self, node: Any, params: dict[str, Any]) -> None:
        """A node's parameter inputs, replayed into the local run if the server goes away."""
        if params:
            self._params.append((node, params))

    def set_tags(self, tags: dict[str, str]) -> None:
        """``mlflow.set_tags`` on the run, wherever it lives now."""
        self.tags.update(tags)
        self.call(lambda: mlflow.set_tags(tags), "setting tags")

    def check(self, where: str) -> None:
        """Fail over if the server does not answer its health check now."""
        if not self.failed_over and not server_answers(self.server_uri):
            self.switch(f"{self.server_uri}/health did not answer", where)

    def call(self, fn: Callable[[], Any], where: str) -> Any:
        """``fn()``; if the server does not answer, fail over and call it again (locally)."""
        try:
            return fn()
        except Exception as e:
            if self.failed_over or server_answers(self.server_uri):
                raise
            self.switch(_reason(e), where)
            return fn()

    def switch(self, reason: str, where: str) -> str:
        """Move the run to the local store (once); returns the local run's id."""
        with self._lock:
            if self.local_run_id is not None:
                return self.local_run_id
            monitor = fluent.run_id_to_system_metrics_monitor.pop(self.run_id, None)
            shutdown = getattr(monitor, "_shutdown_event", None)
            if shutdown is not None:  # its thread ends at its next wake-up, calling nothing
                shutdown.set()
            stack = fluent._active_run_stack.get()
            stack[:] = [r for r in stack if r.info.run_id != self.run_id]  # not ended: unheard
            os.environ.pop("MLFLOW_RUN_ID", None)
            mlflow.set_tracking_uri(LOCAL_TRACKING_URI)
            mlflow.set_experiment(self.experiment_name)
            keep = {k: v for k, v in self.tags.items() if k != "mlflow.runName"}
            run = mlflow.start_run(
                run_name=self.run_name or None,
                tags={
                    **keep,
                    FALLBACK_FOR: self.run_id,
                    FALLBACK_FROM: self.server_uri,
                    FALLBACK_WHERE: where,
                },
            )
            self.local_run_id = run.info.run_id
            self._point_kedro_mlflow_here()
            logger.warning(
                "The MLflow tracking server %s stopped answering (%s) at %s. The run goes on: "
                "checkpoints and outputs are written as usual, and what MLflow records from now "
                "on goes to the local store %s, run %s in experiment '%s' (run %s on the server "
                "holds what came before). Send it to the server once it answers again: %s",
                self.server_uri,
                reason,
                where,
                LOCAL_TRACKING_URI,
                self.local_run_id,
                self.experiment_name,
                self.run_id,
                SYNC_COMMAND,
            )
            return self.local_run_id

    def _point_kedro_mlflow_here(self) -> None:
        """kedro-mlflow reopens its run by id before every node and ends it after the pipeline:
        give it the local run, and the parameters it logged to the server."""
        try:
            from kedro_mlflow.framework.hooks.mlflow_hook import mlflow_hook  # noqa: PLC0415
        except ImportError:  # pragma: no cover - kedro-mlflow is a dependency
            return
        if getattr(mlflow_hook, "run_id", None) != self.run_id:
            return
        mlflow_hook.run_id = self.local_run_id
        mlflow_hook.mlflow_config.server._mlflow_client = MlflowClient(LOCAL_TRACKING_URI)
        for node, params in self._params:
            mlflow_hook.before_node_run(node=node, catalog=None, inputs=params, is_async=False)

    def summary(self) -> str:
        return (
            f"MLflow records of this run since the server {self.server_uri} went away are in "
            f"{LOCAL_TRACKING_URI}, run {self.local_run_id}; send them with: {SYNC_COMMAND}"
        )


_ACTIVE: Failover | None = None


def active_failover() -> Failover | None:
    """The failover armed in this process (None in spawned training processes)."""
    return _ACTIVE


def guarded(fn: Callable[[], Any], where: str) -> Any:
    """``fn()`` through the armed failover (:meth:`Failover.call`), or plainly if none is."""
    failover = active_failover()
    return fn() if failover is None else failover.call(fn, where)


def set_tags(tags: dict[str, str]) -> None:
    """``mlflow.set_tags`` through the armed failover (which also keeps them for the local run
    a later switch starts), or plainly if none is."""
    failover = active_failover()
    if failover is None:
        mlflow.set_tags(tags)
    else:
        failover.set_tags(tags)


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}"


# ---- back to the server -----------------------------------------------------------------------


def pending(local_uri: str = LOCAL_TRACKING_URI, server_uri: str | None = None) -> list[Any]:
    """Local runs that fell back (from ``server_uri``, or any server) and were not sent back."""
    db = _sqlite_file(local_uri)
    if db is not None and not db.is_file():
        return []
    client = MlflowClient(local_uri)
    found = []
    for exp in client.search_experiments():
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{FALLBACK_FROM}` != ''", max_results=5000
        )
        found += [
            r
            for r in runs
            if SYNCED_TO not in r.data.tags
            and r.info.status != "RUNNING"  # still being recorded (or marked KILLED later)
            and (server_uri is None or r.data.tags[FALLBACK_FROM] == server_uri)
        ]
    return found


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@dataclass
class SyncResult:
    local_run_id: str
    server_run_id: str
    params: int
    metrics: int
    artifacts: int
    models: int

    def line(self, server_uri: str) -> str:
        return (
            f"local run {self.local_run_id} -> {server_uri} run {self.server_run_id}: "
            f"{self.params} parameters, {self.metrics} metric values, {self.artifacts} "
            f"artifact files, {self.models} model(s)"
        )


def sync(local_uri: str, server_uri: str, run: Any) -> SyncResult:
    """Send one local fallback run to ``server_uri`` (see the module docstring)."""
    local, server = MlflowClient(local_uri), MlflowClient(server_uri)
    info, data = run.info, run.data
    experiment = local.get_experiment(info.experiment_id).name
    target = data.tags.get(FALLBACK_FOR) or ""
    if target:
        server_run = server.get_run(target)
    else:  # the server was down when the run started: it gets a run of its own now
        exp = server.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else server.create_experiment(experiment)
        server_run = server.create_run(
            exp_id, start_time=info.start_time, tags={"mlflow.runName": info.run_name or ""}
        )
        target = server_run.info.run_id
        local.set_tag(info.run_id, FALLBACK_FOR, target)  # a retried sync finds it again
    have = server_run.data

    params = [Param(k, v) for k, v in data.params.items() if k not in have.params]
    skip = {FALLBACK_FOR, FALLBACK_FROM, FALLBACK_WHERE, "mlflow.runName"}
    tags = [RunTag(k, v) for k, v in data.tags.items() if k not in skip]
    tags.append(RunTag("cassava.synced_from", f"{local_uri} {info.run_id}"))
    for i in range(0, len(params), 100):
        server.log_batch(target, params=params[i : i + 100])
    for i in range(0, len(tags), 100):
        server.log_batch(target, tags=tags[i : i + 100])

    metrics: list[Metric] = []
    for key in data.metrics:
        there = {(m.step, m.timestamp, m.value) for m in server.get_metric_history(target, key)}
        metrics += [
            Metric(key, m.value, m.timestamp, m.step)
            for m in local.get_metric_history(info.run_id, key)
            if (m.step, m.timestamp, m.value) not in there
        ]
    for i in range(0, len(metrics), 1000):
        server.log_batch(target, metrics=metrics[i : i + 1000])

    with tempfile.TemporaryDirectory() as tmp:
        files = 0
        if local.list_artifacts(info.run_id):
            path = mlflow.artifacts.download_artifacts(
                run_id=info.run_id, dst_path=tmp, tracking_uri=local_uri
            )
            files = sum(len(f) for _, _, f in os.walk(path))
            server.log_artifacts(target, path)
    models = _sync_models(local, server, local_uri, server_uri, run, server_run)

    server.set_terminated(target, status=info.status, end_time=info.end_time)
    local.set_tag(info.run_id, SYNCED_TO, f"{server_uri} {target}")
    return SyncResult(info.run_id, target, len(params), len(metrics), files, models)


def _sync_models(local, server, local_uri, server_uri, run, server_run) -> int:
    """The run's logged models (MLflow 3 keeps them apart from the run's artifacts), made again
    on the server with ``source_run_id`` = the server run, so ``runs:/<id>/<name>`` resolves."""
    local_models = [
        m
        for m in local.search_logged_models(experiment_ids=[run.info.experiment_id])
        if m.source_run_id == run.info.run_id
    ]
    exp_id = server_run.info.experiment_id
    done = {
        m.tags.get(SYNCED_MODEL)
        for m in server.search_logged_models(experiment_ids=[exp_id])
        if m.source_run_id == server_run.info.run_id
    }
    count = 0
    for model in local_models:
        if model.model_id in done:
            continue
        made = server.create_logged_model(
            exp_id,
            name=model.name,
            source_run_id=server_run.info.run_id,
            tags={**model.tags, SYNCED_MODEL: model.model_id},
            params=model.params,
            model_type=model.model_type,
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(  # from its location: "models:/<id>" would read the global store
                mlflow.artifacts.download_artifacts(
                    artifact_uri=local.get_logged_model(model.model_id).artifact_location,
                    dst_path=tmp,
                )
            )
            spec = path / "MLmodel"
            if spec.is_file():  # the copy names its own run and model
                doc = yaml.safe_load(spec.read_text())
                doc["run_id"], doc["model_id"] = server_run.info.run_id, made.model_id
                spec.write_text(yaml.safe_dump(doc, sort_keys=False))
            server.log_model_artifacts(made.model_id, str(path))
        server.finalize_logged_model(made.model_id, LoggedModelStatus.READY)
        count += 1
    return count


@contextlib.contextmanager
def _credentials(env: str, conf_source: Path) -> Iterator[str | None]:
    """The server URI of ``conf/<env>/mlflow.yml`` (or base), its credentials exported as
    kedro-mlflow exports them while the ``with`` block runs."""
    # Kedro is imported here only: the served pyfunc imports this package without it.
    from cassava_pipeline.config import LOADER_ARGS, ProjectConfigLoader  # noqa: PLC0415

    loader = ProjectConfigLoader(str(conf_source), env=env, **LOADER_ARGS)
    loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
    server = (loader["mlflow"] or {}).get("server") or {}
    key = server.get("credentials")
    values: dict[str, str] = {}
    if key:
        values = {k: str(v) for k, v in (loader["credentials"].get(key) or {}).items()}
    with environ(values):
        yield server.get("mlflow_tracking_uri")


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` while the ``with`` block runs, then as they were."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cassava_pipeline.fallback",
        description="Send runs recorded locally while the tracking server was away back to it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="copy every pending fallback run into the server")
    s.add_argument("--env", default="local", help="Kedro environment whose mlflow.yml names it")
    s.add_argument("--to", help="the server (default: the environment's mlflow_tracking_uri)")
    s.add_argument("--local", default=LOCAL_TRACKING_URI, help="the local fallback store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not (Path.cwd() / "conf" / args.env).is_dir():
        print(f"no conf/{args.env} here: run this in the project's root folder (make creates "
              "conf/local), or name an environment with --env", file=sys.stderr)  # fmt: skip
        return 2
    with _credentials(args.env, Path.cwd() / "conf") as configured:
        server_uri = args.to or configured
        if not server_uri or not is_remote(server_uri):
            print(f"no tracking server to send runs to (conf/{args.env}/mlflow.yml: "
                  f"{configured!r}); pass --to http://host:port", file=sys.stderr)  # fmt: skip
            return 2
        runs = pending(args.local, None if args.to else server_uri)
        if not runs:
            print(f"nothing to send: no run in {args.local} is waiting for {server_uri}")
            return 0
        if not server_answers(server_uri):
            print(f"{server_uri} does not answer; {len(runs)} run(s) wait in {args.local}. "
                  "Start the server and run this again.", file=sys.stderr)  # fmt: skip
            return 1
        for run in runs:
            print("sent " + sync(args.local, server_uri, run).line(server_uri))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
