"""Hooks around kedro-mlflow's run: provenance, interrupted runs, the mirror on a server.

- Before kedro-mlflow sets MLflow up: the run is recorded in the local store
  (``sqlite:///mlflow.db``) whatever ``mlflow.yml`` names; when it names an ``http(s)``
  tracking server, the run is mirrored there (:mod:`cassava_pipeline.fallback`): made at the
  start, sent after every epoch and node, and whole at the end. A server that does not answer
  gets one warning and the run waits for ``python -m cassava_pipeline.fallback sync``.
- Once kedro-mlflow has started the run: provenance tags (git commit and dirty flag, lock file
  hash, torch / CUDA / device, package versions, the manifest's data hash, and the process id
  and host), the split as MLflow dataset inputs, and signal handlers so that Ctrl-C (SIGINT) or
  SIGTERM marks the run KILLED before the process stops. kedro-mlflow marks a run that raises
  FAILED; MLflow's own exit handler would mark an interrupted run FINISHED. Runs left RUNNING by
  a process of this host that died without ending them (kill -9) are marked KILLED, once, with
  a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl
from mlflow.tracking import MlflowClient

from cassava_pipeline.dvc_runs import (
    PARENT_TAG,
    STAGE_TAG,
    Invocation,
    close_stage,
    invocation,
    open_parent,
)
from cassava_pipeline.fallback import (
    FALLBACK_FOR,
    FALLBACK_FROM,
    FALLBACK_WHERE,
    LOCAL_TRACKING_URI,
    SYNC_COMMAND,
    Mirror,
    active_mirror,
    is_remote,
    pending,
    server_answers,
    start_mirror,
    stop_mirror,
)
from cassava_pipeline.tracking import (
    EXPERIMENT_KIND,
    active_run_id,
    frame_hash,
    log_data_inputs,
    run_name,
    run_tags,
)
from cassava_pipeline.vision.dist import failure_elsewhere, launched_by_torchrun, rank
from cassava_pipeline.vision.learner import RuntimeConfig
from cassava_pipeline.vision.parallel import pid_alive

logger = logging.getLogger(__name__)

_MANIFESTS = ("manifest", "split_manifest")


def _mark_experiment_kind() -> None:
    """Tag the active run's experiment as model training (MLflow 3 then opens it on the runs
    table, not the GenAI overview), unless it already has a kind."""
    client = MlflowClient()
    experiment = client.get_experiment(mlflow.get_run(active_run_id()).info.experiment_id)
    key, kind = EXPERIMENT_KIND
    if key not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, key, kind)


def mark_dead_runs_killed(host: str) -> list[str]:
    """Mark KILLED the runs of the active experiment left RUNNING by a dead process of ``host``
    (kill -9 ends a process before it can end its run); return their ids."""
    current = active_run_id()
    client = MlflowClient()
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


def tag_failure(line: str | None) -> None:
    """On rank 0's MLflow run: which rank failed first, and its error."""
    if not line or active_run_id() is None:
        return
    with contextlib.suppress(Exception):  # tracking never hides the failure itself
        mlflow.set_tags({"failed_rank": line.split()[1], "failure": line[:5000]})


class TrackingHooks:
    """See the module docstring."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._accelerator = RuntimeConfig().accelerator
        self._server: str | None = None  # the tracking server mlflow.yml names
        self._gone: str | None = None  # why it is not called (it did not answer at the start)
        self._catalog: Any = None
        self._dvc: tuple[str, str, str | None] | None = None  # stage, parent run, this run

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        if rank() != 0:  # under torchrun rank 0 alone records the run
            return
        loader = context.config_loader
        if "mlflow" not in loader.config_patterns:
            loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
        try:
            conf = loader["mlflow"]
        except Exception:  # no mlflow.yml: kedro-mlflow warns and uses its defaults
            return
        uri = str((conf.get("server") or {}).get("mlflow_tracking_uri") or "")
        self._server, self._gone = (uri, None) if is_remote(uri) else (None, None)
        if self._server is not None:  # recorded here, mirrored there
            conf = {**conf, "server": {**conf["server"], "mlflow_tracking_uri": LOCAL_TRACKING_URI}}
            loader["mlflow"] = conf
            if not server_answers(uri):
                self._gone = f"{uri}/health did not answer"
                logger.warning(
                    "The MLflow tracking server %s does not answer. This run is recorded in the "
                    "local store %s; training goes on and saves its checkpoints as usual. Start "
                    "the server (README, 'Remote tracking'), then send the run to it: %s",
                    uri,
                    LOCAL_TRACKING_URI,
                    SYNC_COMMAND,
                )
        mlflow.enable_system_metrics_logging()  # CPU, memory, disk, GPU: the run's system tab
        try:
            self._accelerator = str(loader["parameters"]["runtime"]["accelerator"])
        except (KeyError, TypeError):  # parameters of another shape (tests)
            self._accelerator = RuntimeConfig().accelerator

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if active_run_id() is None:
            return
        tags = run_tags(Path(run_params.get("project_path") or Path.cwd()), self._accelerator)
        names = run_params.get("pipeline_names") or [run_params.get("pipeline_name")]
        tags["kedro_pipeline"] = ",".join(str(n) for n in names if n) or "__default__"
        tags["kedro_env"] = str(run_params.get("env") or "local")
        tags["pid"], tags["host"] = str(os.getpid()), socket.gethostname()
        tags["world_size"] = os.environ.get("WORLD_SIZE", "1")  # torchrun's processes
        for name in _MANIFESTS:
            try:
                if catalog.exists(name):
                    tags["data_hash"] = frame_hash(catalog.load(name))
            except Exception:  # a manifest that cannot be read is reported by the pipeline
                pass
        if self._server:  # for the mirror and `python -m cassava_pipeline.fallback sync`
            tags.update({FALLBACK_FROM: self._server, FALLBACK_FOR: ""})
            if self._gone:
                tags[FALLBACK_WHERE] = "start"
        try:
            params = catalog.load("parameters")
        except Exception:  # a catalog without parameters (tests)
            params = {}
        tags["mlflow.runName"] = run_name(params, tags["kedro_env"])
        self._dvc = None
        inv = invocation()
        if inv is not None:  # a stage of dvc repro / dvc exp run: nested under its run
            parent = self._dvc_parent(inv, tags["mlflow.runName"], params)
            if parent is not None:
                self._dvc = (inv.stage, parent, active_run_id())
                tags.update({PARENT_TAG: parent, STAGE_TAG: inv.stage})
                tags["mlflow.runName"] = f"{inv.stage}: {tags['mlflow.runName']}"
        self._catalog = catalog
        mlflow.set_tags(tags)
        _mark_experiment_kind()
        if "split_manifest" not in pipeline.all_outputs():  # a run on an earlier split
            with contextlib.suppress(Exception):  # no split yet: nothing to record
                if catalog.exists("split_manifest"):
                    self._log_data(catalog.load("split_manifest"))
        self._install_signal_handlers()
        mark_dead_runs_killed(tags["host"])
        if self._server:
            self._start_mirror()

    def _start_mirror(self) -> None:
        run_id, parent = str(active_run_id()), self._dvc[1] if self._dvc else None
        if parent is not None:  # the DVC command's run is mirrored with its stages
            with contextlib.suppress(Exception):
                if FALLBACK_FROM not in mlflow.get_run(parent).data.tags:
                    MlflowClient().set_tag(parent, FALLBACK_FROM, self._server)
        mirror = start_mirror(Mirror(str(self._server), run_id, parent, gone=self._gone))
        if self._gone is None:
            waiting = len(pending(LOCAL_TRACKING_URI, self._server))
            if waiting:
                logger.info(
                    "%d earlier MLflow run(s) in %s wait for %s: %s",
                    waiting,
                    LOCAL_TRACKING_URI,
                    self._server,
                    SYNC_COMMAND,
                )
            mirror.push("the start")

    # ---- the run of the DVC command this stage belongs to (cassava_pipeline.dvc_runs) -------
    @staticmethod
    def _dvc_parent(inv: Invocation, name: str, params: dict[str, Any]) -> str | None:
        try:
            experiment_id = mlflow.active_run().info.experiment_id
            return open_parent(MlflowClient(), experiment_id, inv, name, params)
        except Exception as e:  # grouping is for reading the table: never fail a run for it
            logger.warning("this stage's MLflow run is not nested under its DVC run: %s", e)
            return None

    def _close_dvc(self, status: str) -> None:
        if self._dvc is None:
            return
        stage, parent, child = self._dvc
        self._dvc = None
        try:
            close_stage(MlflowClient(), parent, child, stage, status)
        except Exception as e:
            logger.warning("the DVC run %s did not get this stage's results: %s", parent, e)

    # ---- what the run saves ----------------------------------------------------------------
    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if dataset_name in _MANIFESTS and isinstance(data, pd.DataFrame) and active_run_id():
            mlflow.set_tags({"data_hash": frame_hash(data)})
        if dataset_name == "split_manifest" and isinstance(data, pd.DataFrame):
            self._log_data(data)
        if dataset_name == "metrics" and isinstance(data, dict) and active_run_id():
            # the stage the evaluated (and exported) weights come from, and the stages skipped
            mlflow.set_tags(
                {
                    "final_stage": str(data.get("stage", "")),
                    "skipped_stages": ",".join(data.get("skipped", [])) or "none",
                }
            )

    def _log_data(self, split_manifest: pd.DataFrame) -> None:
        if active_run_id() is None:
            return
        try:
            raw = self._catalog.get("raw_images")
        except Exception:
            raw = None
        root = Path(str(getattr(raw, "path", "") or "images"))
        log_data_inputs(split_manifest, str(root.resolve()), root.name)

    @hook_impl(trylast=True)
    def after_node_run(self, node, catalog, inputs, outputs, is_async: bool) -> None:
        mirror = active_mirror()
        if mirror is not None:
            mirror.push(f"node {node.name}")

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        self._close_dvc("FINISHED")  # after NodeTimesHooks logged the times (called first)
        self._restore_signal_handlers()

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        self._close_dvc("FAILED")
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
        # Under torchrun, the agent stops the other ranks when one fails: that run FAILED.
        first = failure_elsewhere() if launched_by_torchrun() else None
        status = "FAILED" if first else "KILLED"
        if first:
            logger.error("%s: stopped by torchrun because %s failed", name, first)
            tag_failure(first)
        if run_id is not None:
            logger.warning("%s: marking MLflow run %s %s", name, run_id, status)
            self._close_dvc(status)
            try:
                # a run stacked by an earlier caller: end every level, or MLflow's exit
                # handler would end the rest FINISHED, overwriting KILLED
                while mlflow.active_run() is not None:
                    mlflow.end_run(status=status)
            except Exception as e:  # never block the interruption itself
                logger.warning("could not mark the run KILLED: %s", e)
            _end_mirror(f"the {name}")
        self._restore_signal_handlers()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


def _end_mirror(where: str) -> None:
    """The run's last push, once kedro-mlflow has ended it (status and end time included)."""
    mirror = stop_mirror()
    if mirror is None:
        return
    mirror.push(where, final=True)
    if mirror.gone is not None:
        logger.info(mirror.summary())


class MirrorEndHooks:
    """After kedro-mlflow has ended the run: the whole run sent to the server it is mirrored
    to (artifacts, models, the final status), or the line that says where it waits."""

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        _end_mirror("the end of the run")

    @hook_impl(trylast=True)
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        _end_mirror("the pipeline's error")
