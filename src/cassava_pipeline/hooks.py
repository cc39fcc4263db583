"""Project hooks around kedro-mlflow's run: reachability, provenance tags, interrupted runs.

- Before kedro-mlflow sets MLflow up: an ``http(s)`` tracking server that does not answer is
  replaced, with a warning, by the local SQLite store (``sqlite:///mlflow.db``), so the run
  trains, saves its checkpoints and is still recorded. A server that stops answering later is
  failed over to the same store (:mod:`cassava_pipeline.fallback`): checked before each node,
  before each save to an MLflow dataset and when the run ends. Either way the local run is
  tagged for ``python -m cassava_pipeline.fallback sync``.
- Once kedro-mlflow has started the run: provenance tags (git commit and dirty flag, lock file
  hash, torch / CUDA / device, package versions, the manifest's data hash, and the process id
  and host), and signal handlers so that Ctrl-C (SIGINT) or SIGTERM marks the run KILLED before
  the process stops. kedro-mlflow marks a run that raises FAILED; MLflow's own exit handler
  would mark an interrupted run FINISHED. Runs left RUNNING by a process of this host that died
  without ending them (kill -9) are marked KILLED, once, with a warning.
- :class:`ParametersHooks`: every parameter checked before anything runs.
- :class:`NodeTimesHooks`: each node's wall-clock time, in the log and in the MLflow run.
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
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

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
    Failover,
    active_failover,
    guarded,
    is_remote,
    pending,
    server_answers,
    set_tags,
)
from cassava_pipeline.params import check_parameters
from cassava_pipeline.runlock import RunLock
from cassava_pipeline.tracking import (
    EXPERIMENT_KIND,
    active_run_id,
    frame_hash,
    log_data_inputs,
    run_name,
    run_tags,
)
from cassava_pipeline.vision.atomic import remove_dead_temps_under
from cassava_pipeline.vision.dist import (
    end_process_group,
    ensure_process_group,
    failure_elsewhere,
    launched_by_torchrun,
    rank,
    report_failure,
)
from cassava_pipeline.vision.parallel import pid_alive

logger = logging.getLogger(__name__)

_MANIFESTS = ("manifest", "split_manifest")
__all__ = [
    "DistributedHooks",
    "FailoverEndHooks",
    "KedroMlflowHooks",
    "NodeTimesHooks",
    "ParametersHooks",
    "RunLockHooks",
    "TrackingHooks",
    "mark_dead_runs_killed",
    "server_answers",
]


def _mark_experiment_kind() -> None:
    """Tag the active run's experiment as model training (MLflow 3 then opens it on the runs
    table, not the GenAI overview), unless it already has a kind."""
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment(mlflow.get_run(active_run_id()).info.experiment_id)
    key, kind = EXPERIMENT_KIND
    if key not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, key, kind)


def mark_dead_runs_killed(host: str) -> list[str]:
    """Mark KILLED the runs of the active experiment left RUNNING by a dead process of ``host``
    (kill -9 ends a process before it can end its run); return their ids.

    A server run whose process failed over to the local store and finished there is not dead:
    it waits for ``python -m cassava_pipeline.fallback sync``, which gives it its real status.
    """
    current = active_run_id()
    client = mlflow.tracking.MlflowClient()
    waiting: set[str] = set()
    try:
        if is_remote(mlflow.get_tracking_uri()):
            waiting = {
                r.data.tags.get(FALLBACK_FOR, "")
                for r in pending(LOCAL_TRACKING_URI, mlflow.get_tracking_uri())
            }
    except Exception as e:  # a local store that cannot be read: nothing is waiting in it
        logger.debug("could not read %s: %s", LOCAL_TRACKING_URI, e)
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
        and r.info.run_id not in waiting
        and r.data.tags.get("host") == host
        and r.data.tags.get("pid", "").isdigit()
        and not pid_alive(int(r.data.tags["pid"]))
    ]
    for run_id in dead:
        client.set_terminated(run_id, status="KILLED")
    if waiting & {r.info.run_id for r in running}:
        logger.info(
            "MLflow records of earlier run(s) wait in %s for this server: %s",
            LOCAL_TRACKING_URI,
            SYNC_COMMAND,
        )
    if dead:
        logger.warning(
            "marked %d MLflow run(s) KILLED: their process died without ending them (kill -9?): %s",
            len(dead),
            ", ".join(dead),
        )
    return dead


class DistributedHooks:
    """Under ``torchrun``: the process group every rank shares from the pipeline's start (rank 0
    writes, the others wait at barriers; :mod:`cassava_pipeline.vision.dist`), torn down once
    every rank has finished."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        ensure_process_group()

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        end_process_group()

    @hook_impl(tryfirst=True)  # before kedro-mlflow marks the run FAILED: its tags say why
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        if not launched_by_torchrun():
            return
        first = failure_elsewhere()
        if first is None:
            first = report_failure(error)
        else:
            logger.error(
                "stopping: %s failed first (this rank's %s follows from it)",
                first,
                type(error).__name__,
            )
        _tag_failure(first)


def _tag_failure(line: str | None) -> None:
    """On rank 0's MLflow run: which rank failed first, and its error."""
    if not line or active_run_id() is None:
        return
    with contextlib.suppress(Exception):  # tracking never hides the failure itself
        set_tags({"failed_rank": line.split()[1], "failure": line[:5000]})


class RunLockHooks:
    """Takes the project's run lock before the run starts; releases it when the run ends."""

    def __init__(self) -> None:
        self._lock: RunLock | None = None

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if rank() != 0:  # torchrun: rank 0 holds it for the job
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
        self._unreachable: str | None = None  # the server that did not answer at the start
        self._failover: Failover | None = None
        self._catalog: Any = None
        self._tracked: dict[str, bool] = {}  # dataset name -> is it an MLflow dataset
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
        self._unreachable = None
        if is_remote(uri) and not server_answers(uri):
            self._unreachable = uri
            logger.warning(
                "The MLflow tracking server %s does not answer. This run is recorded in the local "
                "store %s instead; training goes on and saves its checkpoints as usual. Start "
                "the server (README, 'Remote tracking'), then send the run to it: %s",
                uri,
                LOCAL_TRACKING_URI,
                SYNC_COMMAND,
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
        tags["world_size"] = os.environ.get("WORLD_SIZE", "1")  # torchrun's processes
        for name in _MANIFESTS:
            try:
                if catalog.exists(name):
                    tags["data_hash"] = frame_hash(catalog.load(name))
            except Exception:  # a manifest that cannot be read is reported by the pipeline
                pass
        if self._unreachable:  # for `python -m cassava_pipeline.fallback sync`
            tags.update({FALLBACK_FROM: self._unreachable, FALLBACK_FOR: ""})
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
        self._catalog, self._tracked = catalog, {}
        self._failover = Failover.for_active_run()  # None unless the store is a server
        set_tags(tags)
        guarded(_mark_experiment_kind, "the experiment's kind")
        if "split_manifest" not in pipeline.all_outputs():  # a run on an earlier split
            with contextlib.suppress(Exception):  # no split yet: nothing to record
                if catalog.exists("split_manifest"):
                    self._log_data(catalog.load("split_manifest"))
        self._install_signal_handlers()
        mark_dead_runs_killed(tags["host"])

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

    # ---- a server that stops answering mid-run (cassava_pipeline.fallback) -----------------
    @hook_impl(tryfirst=True)
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        if self._failover is None:
            return
        params = {k: v for k, v in inputs.items() if k.startswith("params:") or k == "parameters"}
        self._failover.remember_params(node, params)
        self._failover.check(f"node {node.name}")  # before kedro-mlflow logs its parameters

    @hook_impl(tryfirst=True)
    def before_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if self._failover is not None and self._is_tracked(dataset_name):
            self._failover.check(f"saving {dataset_name}")

    def _is_tracked(self, name: str) -> bool:
        if name not in self._tracked:
            try:
                dataset = self._catalog.get(name)
            except Exception:
                dataset = None
            kind = type(dataset)
            self._tracked[name] = kind.__module__.startswith("kedro_mlflow") or "Mlflow" in (
                kind.__name__
            )
        return self._tracked[name]

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if dataset_name in _MANIFESTS and isinstance(data, pd.DataFrame) and active_run_id():
            set_tags({"data_hash": frame_hash(data)})
        if dataset_name == "split_manifest" and isinstance(data, pd.DataFrame):
            self._log_data(data)
        if dataset_name == "metrics" and isinstance(data, dict) and active_run_id():
            # the stage the evaluated (and exported) weights come from, and the stages skipped
            set_tags(
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
        root = Path(str(getattr(raw, "_path", "") or "images"))
        guarded(
            lambda: log_data_inputs(split_manifest, str(root.resolve()), root.name),
            "the data inputs",
        )

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        if self._failover is not None:  # kedro-mlflow ends the run next
            self._failover.check("the end of the run")
        self._close_dvc("FINISHED")  # after NodeTimesHooks logged the times (called first)
        self._restore_signal_handlers()

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        if self._failover is not None:  # kedro-mlflow marks the run FAILED next
            self._failover.check("the pipeline's error")
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
            _tag_failure(first)
        if run_id is not None:
            logger.warning("%s: marking MLflow run %s %s", name, run_id, status)
            self._close_dvc(status)
            try:
                # kedro-mlflow may have stacked the run (restarted per node): end every level,
                # or MLflow's exit handler would end the rest FINISHED, overwriting KILLED.
                while mlflow.active_run() is not None:
                    mlflow.end_run(status=status)
            except Exception as e:  # never block the interruption itself
                logger.warning("could not mark the run KILLED: %s", e)
        self._restore_signal_handlers()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


class ParametersHooks:
    """Every parameter checked against the schema (:mod:`cassava_pipeline.params`) as soon as the
    Kedro context exists: before MLflow, the run lock or any node, so that a bad value stops the
    run at once with every problem named."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        check_parameters(context.params)


class NodeTimesHooks:
    """Each node's wall-clock time, from loading its first input to saving its last output (the
    whole node: data, training, checkpoints, tracking): one log line at the end of the run and,
    in the MLflow run, metrics ``seconds/<node>`` and ``seconds/run`` (from the first node's
    start to the last node's end), so that runs compare stage by stage in the MLflow UI.
    """

    def __init__(self) -> None:
        self._start: dict[str, float] = {}
        self._end: dict[str, float] = {}

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._start, self._end = {}, {}

    def _started(self, node) -> None:
        self._start.setdefault(node.name, time.perf_counter())

    def _ended(self, node) -> None:
        self._end[node.name] = time.perf_counter()

    @hook_impl(tryfirst=True)
    def before_dataset_loaded(self, dataset_name: str, node) -> None:
        self._started(node)

    @hook_impl(tryfirst=True)
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        self._started(node)  # a node without inputs

    @hook_impl(trylast=True)
    def after_node_run(self, node, catalog, inputs, outputs, is_async: bool) -> None:
        self._ended(node)  # a node without outputs

    @hook_impl(trylast=True)
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        self._ended(node)

    def times(self) -> dict[str, float]:
        """Seconds per finished node, in the order they ran, and ``run`` for them all."""
        done = [n for n in self._start if n in self._end]
        out = {n: self._end[n] - self._start[n] for n in done}
        if done:
            out["run"] = max(self._end[n] for n in done) - min(self._start[n] for n in done)
        return out

    @hook_impl(tryfirst=True)  # before kedro-mlflow ends the run
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        times = self.times()
        if not times or rank() != 0:
            return
        logger.info(
            "node times: %s", ", ".join(f"{name} {sec:.1f} s" for name, sec in times.items())
        )
        if active_run_id() is not None:
            metrics = {f"seconds/{name}": round(sec, 3) for name, sec in times.items()}
            guarded(lambda: mlflow.log_metrics(metrics), "the node times")


class FailoverEndHooks:
    """After kedro-mlflow has ended the run: the failover is disarmed (MLflow's HTTP settings and
    log levels as they were) and, if the run fell back, its last line says where it went."""

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        self._end()

    @hook_impl(trylast=True)
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        self._end()

    @staticmethod
    def _end() -> None:
        failover = active_failover()
        if failover is None:
            return
        failover.disarm()
        if failover.failed_over:
            logger.info(failover.summary())


class KedroMlflowHooks:
    """kedro-mlflow's own hook, each call made through the failover.

    ``settings.py`` disables the plugin's registration and registers this instead: a server that
    goes away while kedro-mlflow talks to it (reopening the run and logging parameters before a
    node, ending the run) moves the run to the local store and the call is made again there,
    instead of failing a pipeline whose work is done.
    """

    def __init__(self, inner: Any = None) -> None:
        if inner is None:
            # kedro-mlflow's KedroPipelineModel (a pyfunc of whole pipelines, unused here) has no
            # type hints on its predict, and MLflow warns when the class is defined: at this
            # import, in every run. Not ours to annotate, nothing for a user to act on. MLflow
            # sets its own "once" filter around that check, so an "ignore" filter cannot reach
            # it: the import's warnings are recorded and all but that one shown again. Kedro's
            # logging set-up (which reroutes warnings, and would undo the recording) runs first.
            import kedro.framework.project  # noqa: F401, PLC0415

            with warnings.catch_warnings(record=True) as caught:
                from kedro_mlflow.framework.hooks.mlflow_hook import mlflow_hook  # noqa: PLC0415
            for w in caught:
                if "Add type hints to the `predict`" not in str(w.message):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

            inner = mlflow_hook
        self._inner = inner
        self._lock = threading.Lock()

    @hook_impl
    def after_context_created(self, context) -> None:
        if rank() == 0:  # under torchrun one MLflow run, rank 0's: the others record nothing
            self._inner.after_context_created(context)

    @hook_impl
    def after_catalog_created(
        self, catalog, conf_catalog, conf_creds, parameters, save_version, load_versions
    ) -> None:
        if rank() == 0:
            self._inner.after_catalog_created(
                catalog, conf_catalog, conf_creds, parameters, save_version, load_versions
            )

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if rank() != 0:
            from kedro_mlflow.io.catalog.switch_catalog_logging import (  # noqa: PLC0415
                switch_catalog_logging,
            )

            switch_catalog_logging(catalog, False)  # its datasets would open runs of their own
            return
        self._inner.before_pipeline_run(run_params, pipeline, catalog)

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        if rank() != 0:
            return
        guarded(lambda: self._before_node_run(node, catalog, inputs, is_async), f"node {node.name}")

    def _before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        """kedro-mlflow's per-node hook, without reopening a run this thread already has open.

        kedro-mlflow reopens its run before every node (for runners whose nodes run in other
        threads) with ``nested=True``: in the thread that already holds it, that stacks the same
        run once more per node, starts one more system-metrics monitor each time, and on an error
        closes it once per level ("was closed because of an error" a dozen times). Where the run
        is already active here, only its parameter logging runs.
        """
        with self._lock:  # a ThreadRunner's nodes must not see the id while it is set aside
            active = mlflow.active_run()
            run_id = getattr(self._inner, "run_id", None)
            if active is None or run_id is None or active.info.run_id != run_id:
                self._in_one_batch(
                    lambda: self._inner.before_node_run(node, catalog, inputs, is_async)
                )
                return
            self._inner.run_id = None  # kedro-mlflow reopens the run only when it has an id
            try:
                self._in_one_batch(
                    lambda: self._inner.before_node_run(node, catalog, inputs, is_async)
                )
            finally:
                self._inner.run_id = run_id

    def _in_one_batch(self, call) -> None:
        """``call`` with the parameters kedro-mlflow logs sent as one ``log_params`` (MLflow's
        log_batch) instead of one request each: the demo's nodes take 453 parameters, 0.8 s one
        by one against the local store and a round trip each against a server. Values too long
        for MLflow still go through kedro-mlflow's own ``long_params_strategy``."""
        original = getattr(self._inner, "_log_param", None)
        if original is None:
            call()
            return
        batch: dict[str, Any] = {}

        def collect(name: str, value: Any) -> None:
            if len(str(value)) <= MAX_PARAM_VAL_LENGTH:
                batch[name] = value
            else:
                original(name, value)

        own = "_log_param" in vars(self._inner)  # kedro-mlflow's is the class's method
        self._inner._log_param = collect
        try:
            call()
        finally:
            if own:
                self._inner._log_param = original
            else:
                del self._inner._log_param
        if batch:
            mlflow.log_params(batch)

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        if rank() != 0:
            return
        guarded(lambda: self._inner.after_pipeline_run(run_params, pipeline, catalog), "the end")

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        if rank() != 0:
            return
        guarded(
            lambda: self._inner.on_pipeline_error(error, run_params, pipeline, catalog),
            "the pipeline's error",
        )
