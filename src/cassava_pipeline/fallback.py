"""The local store, and its mirror on a tracking server.

Every run is recorded in the local store ``sqlite:///mlflow.db``, whatever ``mlflow.yml``
names: kedro-mlflow, the epoch logger and the MLflow datasets write there, and nothing they do
waits on a network. When ``mlflow.yml`` names an ``http(s)`` tracking server, the project's
hooks (:mod:`cassava_pipeline.hooks`) mirror the run to it with MLflow's public client: the
server run is made at the start, parameters, tags and metrics are sent after every epoch and
node (the MLflow UI draws curves while a long run goes on), and at the end the whole run:
artifacts, logged models and the final status.

A server that does not answer (its ``/health``, 3 s at most) is not waited for: one warning,
no more calls to it in this run, and the run, complete in the local store, waits for
``python -m cassava_pipeline.fallback sync``, which sends every waiting run what its server run
does not have yet. A second sync sends nothing; a synced run is tagged ``cassava.synced_to``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

LOCAL_TRACKING_URI = "sqlite:///mlflow.db"
FALLBACK_FOR = "cassava.fallback_for"  # the server run this local run is mirrored to ("": none)
FALLBACK_FROM = "cassava.fallback_from"  # the server the run is for
FALLBACK_WHERE = "cassava.fallback_at"  # where the run was when the server went away
SYNCED_TO = "cassava.synced_to"  # "<server uri> <run id>" once sent back whole
SYNCED_MODEL = "cassava.synced_from_model"  # on a server's logged model: the local model id
SYNC_COMMAND = "python -m cassava_pipeline.fallback sync"
PARENT = "mlflow.parentRunId"  # MLflow's tag of a nested run (a DVC stage under its command)

# The mirror's calls: one retry, a short timeout (a dead server is given up, not waited for).
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per push would fill the run's log
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
    """urllib3's retry records of a server that went away mid-call, lowered to DEBUG (the
    mirror warns once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Retrying"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


@contextlib.contextmanager
def _few_retries() -> Iterator[None]:
    """:data:`HTTP_ENV` (where the user set none) and urllib3's retry noise demoted."""
    log, demote = logging.getLogger("urllib3.connectionpool"), _Demote()
    log.addFilter(demote)
    try:
        with environ({k: v for k, v in HTTP_ENV.items() if k not in os.environ}):
            yield
    finally:
        log.removeFilter(demote)


@dataclass
class Mirror:
    """The mirror of one local run (and its DVC parent run) on ``server_uri``."""

    server_uri: str
    run_id: str
    parent_id: str | None = None  # the run of the DVC command this stage belongs to
    local_uri: str = LOCAL_TRACKING_URI
    gone: str | None = None  # why the server was given up (it is not called again)
    known: Known | None = None  # what the server run holds (kept between pushes)

    def push(self, where: str, *, final: bool = False) -> bool:
        """Send the server what it lacks of the run (``final``: artifacts, models and status
        too, and the parent's); False, with one warning the first time, when it does not
        answer."""
        if self.gone is not None:
            return False
        try:
            with _few_retries():
                if not server_answers(self.server_uri):
                    raise ConnectionError(f"{self.server_uri}/health did not answer")
                local = MlflowClient(self.local_uri)
                run = local.get_run(self.run_id)
                sent = sync(self.local_uri, self.server_uri, run, final=final, known=self.known)
                self.known = sent.known
                if final and self.parent_id:
                    parent = local.get_run(self.parent_id)
                    done = parent.info.status != "RUNNING"
                    sync(self.local_uri, self.server_uri, parent, final=done)
            return True
        except Exception as e:
            refused = server_answers(self.server_uri)  # it answers: it turned the call down
            self.give_up(_reason(e), where, refused=refused)
            return False

    def give_up(self, reason: str, where: str, *, refused: bool = False) -> None:
        """Stop calling the server for this run: one warning, and the run waits for sync."""
        self.gone = reason
        with contextlib.suppress(Exception):
            MlflowClient(self.local_uri).set_tag(self.run_id, FALLBACK_WHERE, where)
        what = "refused the run's records" if refused else "stopped answering"
        logger.warning(
            "The MLflow tracking server %s %s (%s) at %s. The run goes on: checkpoints and "
            "outputs are written as usual, and the run is recorded whole in the local store %s, "
            "run %s. Send it to the server once it %s: %s",
            self.server_uri,
            what,
            reason,
            where,
            self.local_uri,
            self.run_id,
            "takes them (credentials, permissions)" if refused else "answers again",
            SYNC_COMMAND,
        )

    def summary(self) -> str:
        return (
            f"MLflow records of this run are in {self.local_uri}, run {self.run_id}; the server "
            f"{self.server_uri} did not get them all. Send them with: {SYNC_COMMAND}"
        )


_ACTIVE: Mirror | None = None


def start_mirror(mirror: Mirror) -> Mirror:
    """Make ``mirror`` this process's (one run at a time)."""
    global _ACTIVE  # noqa: PLW0603 - one mirror per process
    _ACTIVE = mirror
    return mirror


def stop_mirror() -> Mirror | None:
    """End this process's mirror (for the run's last push); returns it."""
    global _ACTIVE
    mirror, _ACTIVE = _ACTIVE, None
    return mirror


def active_mirror() -> Mirror | None:
    """This process's mirror (None without a server, and in spawned training processes)."""
    return _ACTIVE


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}"


# ---- back to the server -----------------------------------------------------------------------


def pending(local_uri: str = LOCAL_TRACKING_URI, server_uri: str | None = None) -> list[Any]:
    """Local runs for a server (``server_uri``, or any) not yet sent to it whole, and ended."""
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
    known: Any = None  # what the server run holds now (Known)

    def line(self, server_uri: str) -> str:
        return (
            f"local run {self.local_run_id} -> {server_uri} run {self.server_run_id}: "
            f"{self.params} parameters, {self.metrics} metric values, {self.artifacts} "
            f"artifact files, {self.models} model(s)"
        )


@dataclass
class Known:
    """What a server run holds, fetched once and kept up to date by each push, so that a push
    asks the server nothing it was already told (a mirror's pushes share one)."""

    run_id: str
    params: set[str] = field(default_factory=set)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, set[tuple[int, int, float]]] = field(default_factory=dict)


def sync(
    local_uri: str, server_uri: str, run: Any, *, final: bool = True, known: Known | None = None
) -> SyncResult:
    """Send one local run to ``server_uri``: what its server run (made on the first call) lacks
    of its parameters, tags and metric histories; ``final``: also its artifacts, logged models
    and status, and the run is tagged synced (a second sync sends nothing). ``known``: what the
    server run is known to hold (updated here); without it, it is read from the server."""
    local, server = MlflowClient(local_uri), MlflowClient(server_uri)
    info, data = run.info, run.data
    target = data.tags.get(FALLBACK_FOR) or ""
    if not target:  # the first push of this run, or the server was down when it started
        experiment = local.get_experiment(info.experiment_id)
        exp = server.get_experiment_by_name(experiment.name)
        exp_id = exp.experiment_id if exp else server.create_experiment(
            experiment.name, tags=experiment.tags
        )  # fmt: skip
        made = server.create_run(
            exp_id, start_time=info.start_time, tags={"mlflow.runName": info.run_name or ""}
        )
        target = made.info.run_id
        local.set_tag(info.run_id, FALLBACK_FOR, target)  # a retried sync finds it again
        known = Known(target, tags=dict(made.data.tags))
    elif known is None or known.run_id != target:
        have = server.get_run(target).data
        known = Known(target, set(have.params), dict(have.tags))
    result = SyncResult(info.run_id, target, 0, 0, 0, 0, known)

    params = [Param(k, v) for k, v in data.params.items() if k not in known.params]
    skip = {FALLBACK_FOR, FALLBACK_FROM, FALLBACK_WHERE, "mlflow.runName"}
    wanted = {k: v for k, v in data.tags.items() if k not in skip}
    if PARENT in wanted:  # the parent's id on the server (sent first when it has none)
        parent = _server_id(local_uri, server_uri, wanted.pop(PARENT))
        if parent:
            wanted[PARENT] = parent
    wanted["cassava.synced_from"] = f"{local_uri} {info.run_id}"
    tags = [RunTag(k, v) for k, v in wanted.items() if known.tags.get(k) != v]
    for i in range(0, len(params), 100):
        server.log_batch(target, params=params[i : i + 100])
        known.params.update(p.key for p in params[i : i + 100])
    for i in range(0, len(tags), 100):
        server.log_batch(target, tags=tags[i : i + 100])
        known.tags.update((t.key, t.value) for t in tags[i : i + 100])
    result.params = len(params)

    new: list[Metric] = []
    for key in data.metrics:
        if not final and key.startswith("system/"):  # sampled every few seconds: at the end
            continue
        if key not in known.metrics:
            known.metrics[key] = {
                (m.step, m.timestamp, m.value) for m in server.get_metric_history(target, key)
            }
        new += [
            Metric(key, m.value, m.timestamp, m.step)
            for m in local.get_metric_history(info.run_id, key)
            if (m.step, m.timestamp, m.value) not in known.metrics[key]
        ]
    for i in range(0, len(new), 1000):  # every key's new values in one request
        server.log_batch(target, metrics=new[i : i + 1000])
        for m in new[i : i + 1000]:
            known.metrics[m.key].add((m.step, m.timestamp, m.value))
    result.metrics = len(new)
    if not final:
        return result

    with tempfile.TemporaryDirectory() as tmp:
        if local.list_artifacts(info.run_id):
            path = mlflow.artifacts.download_artifacts(
                run_id=info.run_id, dst_path=tmp, tracking_uri=local_uri
            )
            result.artifacts = sum(len(f) for _, _, f in os.walk(path))
            server.log_artifacts(target, path)
    result.models = _sync_models(local, server, run, target)
    server.set_terminated(target, status=info.status, end_time=info.end_time)
    local.set_tag(info.run_id, SYNCED_TO, f"{server_uri} {target}")
    return result


def _server_id(local_uri: str, server_uri: str, run_id: str) -> str | None:
    """The server run of a local run, made (and sent what it has) if it has none yet."""
    run = MlflowClient(local_uri).get_run(run_id)
    there = run.data.tags.get(FALLBACK_FOR)
    if there:
        return there
    return sync(local_uri, server_uri, run, final=False).server_run_id


def _sync_models(local, server, run, server_run_id: str) -> int:
    """The run's logged models (MLflow 3 keeps them apart from the run's artifacts), made again
    on the server with ``source_run_id`` = the server run, so ``runs:/<id>/<name>`` resolves."""
    local_models = [
        m
        for m in local.search_logged_models(experiment_ids=[run.info.experiment_id])
        if m.source_run_id == run.info.run_id
    ]
    exp_id = server.get_run(server_run_id).info.experiment_id
    done = {
        m.tags.get(SYNCED_MODEL)
        for m in server.search_logged_models(experiment_ids=[exp_id])
        if m.source_run_id == server_run_id
    }
    count = 0
    for model in local_models:
        if model.model_id in done:
            continue
        made = server.create_logged_model(
            exp_id,
            name=model.name,
            source_run_id=server_run_id,
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
                doc["run_id"], doc["model_id"] = server_run_id, made.model_id
                spec.write_text(yaml.safe_dump(doc, sort_keys=False))
            server.log_model_artifacts(made.model_id, str(path))
        server.finalize_logged_model(made.model_id, LoggedModelStatus.READY)
        _register(local, server, model.model_id, made.model_id, server_run_id)
        count += 1
    return count


def _register(local, server, local_model: str, server_model: str, server_run: str) -> None:
    """The registry versions a local model has (``registered_model_name``), made on the server
    for the model made there."""
    for version in local.search_model_versions(f"run_id = '{_run_of(local, local_model)}'"):
        if getattr(version, "model_id", None) != local_model:
            continue
        if not server.search_registered_models(f"name = '{version.name}'"):
            server.create_registered_model(version.name)
        server.create_model_version(
            version.name, f"models:/{server_model}", run_id=server_run, model_id=server_model
        )


def _run_of(client, model_id: str) -> str:
    return client.get_logged_model(model_id).source_run_id


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
        description="Send the tracking server the local runs it did not get whole (it was away).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="send every waiting local run to the server")
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
