"""Project hooks around kedro-mlflow's run: reachability, provenance tags, interrupted runs.

- Before kedro-mlflow sets MLflow up: an ``http(s)`` tracking server that does not answer is
  replaced, with a warning, by the local SQLite store (``sqlite:///mlflow.db``), so the run
  trains, saves its checkpoints and is still recorded.
- Once kedro-mlflow has started the run: provenance tags (git commit and dirty flag, lock file
  hash, torch / CUDA / device, package versions, the manifest's data hash, and the process id
  and host), and signal handlers so that Ctrl-C (SIGINT) or SIGTERM marks the run KILLED before
  the process stops. kedro-mlflow marks a run that raises FAILED; MLflow's own exit handler
  would mark an interrupted run FINISHED. Runs left RUNNING by a process of this host that died
  without ending them (kill -9) are marked KILLED, once, with a warning.
- :class:`RunLockHooks`: one ``kedro run`` at a time per project and environment
  (:mod:`cassava_pipeline.runlock`), taken before anything else runs.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl

from cassava_pipeline.runlock import RunLock
from cassava_pipeline.tracking import active_run_id, frame_hash, run_tags
from cassava_pipeline.vision.atomic import remove_dead_temps_under
from cassava_pipeline.vision.parallel import pid_alive

logger = logging.getLogger(__name__)

LOCAL_TRACKING_URI = "sqlite:///mlflow.db"
_MANIFESTS = ("manifest", "split_manifest")


def server_answers(uri: str, timeout: float = 3.0) -> bool:
    """Whether an MLflow tracking server answers its health check."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def mark_dead_runs_killed(host: str) -> list[str]:
    """Mark KILLED the runs of the active experiment left RUNNING by a dead process of ``host``
    (kill -9 ends a process before it can end its run); return their ids."""
    current = active_run_id()
    client = mlflow.tracking.MlflowClient()
    try:
        exp = mlflow.get_experiment(mlflow.get_run(current).info.experiment_id)
        running = client.search_runs(
            [exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
        )
    except Exception as e:  # tracking must never fail the run
        logger.warning("could not look for runs left RUNNING: %s", e)
        return []
    dead = [
        r.info.run_id
        for r in running
        if r.info.run_id != current
        and r.data.tags.get("host") == host
        and r.data.tags.get("pid", "").isdigit()
        and not pid_alive(int(r.data.tags["pid"]))
    ]
    for run_id in dead:
        client.set_terminated(run_id, status="KILLED")
    if dead:
        logger.warning(
            "marked %d MLflow run(s) KILLED: their process died without ending them (kill -9?): %s",
            len(dead),
            ", ".join(dead),
        )
    return dead


class RunLockHooks:
    """Takes the project's run lock before the run starts; releases it when the run ends."""

    def __init__(self) -> None:
        self._lock: RunLock | None = None

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds it for the job
            return
        project = Path(run_params.get("project_path") or Path.cwd())
        self._lock = RunLock(project, str(run_params.get("env") or "local"))
        self._lock.acquire()  # raises ProjectBusyError at once if another run holds it
        atexit.register(self._release)  # Ctrl-C and SIGTERM end the process without a hook
        if (project / "data").is_dir():  # what runs killed mid-write (kill -9) left behind
            remove_dead_temps_under(project / "data")

    @hook_impl
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class TrackingHooks:
    """See the module docstring."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._accelerator = "auto"

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        loader = context.config_loader
        if "mlflow" not in loader.config_patterns:
            loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
        try:
            conf = loader["mlflow"]
        except Exception:  # no mlflow.yml: kedro-mlflow warns and uses its defaults
            return
        uri = str((conf.get("server") or {}).get("mlflow_tracking_uri") or "")
        if uri.startswith(("http://", "https://")) and not server_answers(uri):
            logger.warning(
                "The MLflow tracking server %s does not answer. This run is recorded in the local "
                "store %s instead; training goes on and saves its checkpoints as usual. Start "
                "the server (README, 'Remote tracking') to record the next runs there.",
                uri,
                LOCAL_TRACKING_URI,
            )
            conf = {**conf, "server": {**conf["server"], "mlflow_tracking_uri": LOCAL_TRACKING_URI}}
            loader["mlflow"] = conf
        mlflow.enable_system_metrics_logging()  # CPU, memory, disk, GPU: the run's system tab
        try:
            self._accelerator = str(loader["parameters"]["runtime"]["accelerator"])
        except (KeyError, TypeError):
            self._accelerator = "auto"

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if active_run_id() is None:
            return
        tags = run_tags(Path(run_params.get("project_path") or Path.cwd()), self._accelerator)
        names = run_params.get("pipeline_names") or [run_params.get("pipeline_name")]
        tags["kedro_pipeline"] = ",".join(str(n) for n in names if n) or "__default__"
        tags["kedro_env"] = str(run_params.get("env") or "local")
        tags["pid"], tags["host"] = str(os.getpid()), socket.gethostname()
        for name in _MANIFESTS:
            try:
                if catalog.exists(name):
                    tags["data_hash"] = frame_hash(catalog.load(name))
            except Exception:  # a manifest that cannot be read is reported by the pipeline
                pass
        mlflow.set_tags(tags)
        self._install_signal_handlers()
        mark_dead_runs_killed(tags["host"])

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if dataset_name in _MANIFESTS and isinstance(data, pd.DataFrame) and active_run_id():
            mlflow.set_tag("data_hash", frame_hash(data))

    @hook_impl
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        self._restore_signal_handlers()

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        self._restore_signal_handlers()

    # ---- interrupted runs ----------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                return

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        run_id = active_run_id()
        if run_id is not None:
            logger.warning("%s: marking MLflow run %s KILLED", name, run_id)
            try:
                # kedro-mlflow may have stacked the run (restarted per node): end every level,
                # or MLflow's exit handler would end the rest FINISHED, overwriting KILLED.
                while mlflow.active_run() is not None:
                    mlflow.end_run(status="KILLED")
            except Exception as e:  # never block the interruption itself
                logger.warning("could not mark the run KILLED: %s", e)
        self._restore_signal_handlers()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
