"""Hooks around the run itself: its lock, torchrun's process group, the parameters, node times."""

from __future__ import annotations

import atexit
import logging
import time
from pathlib import Path
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl

from cassava_pipeline.hooks.mlflow_run import tag_failure
from cassava_pipeline.params import ParameterError, check_parameters
from cassava_pipeline.runlock import RunLock
from cassava_pipeline.tracking import active_run_id
from cassava_pipeline.vision.atomic import remove_dead_temps_under
from cassava_pipeline.vision.dist import (
    end_process_group,
    ensure_process_group,
    failure_elsewhere,
    launched_by_torchrun,
    rank,
    report_failure,
)
from cassava_pipeline.vision.folds import fold_name, fold_number

logger = logging.getLogger(__name__)


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
        tag_failure(first)


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


class ParametersHooks:
    """Every parameter checked against the dataclasses the nodes use
    (:mod:`cassava_pipeline.params`) as soon as the Kedro context exists: before MLflow, the run
    lock or any node, so that a bad value stops the run at once with every problem named."""

    def __init__(self) -> None:
        self._folds: int | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        self._folds = check_parameters(context.params).cv.folds

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        """cassava_cv has one namespace per fold, built from the parameter files before Kedro
        reads ``--params``: a ``cv.folds`` the pipeline was not built with is refused. The run's
        own nodes may be fewer (``--namespaces``, ``--to-nodes``): the count is the registered
        pipeline's, and no fold of the run may lie past ``cv.folds``."""
        if self._folds is None:
            return
        names = run_params.get("pipeline_names") or [run_params.get("pipeline_name")]
        for whole in [pipeline, *registered([n for n in names if n])]:
            built = folds_of(whole)
            if not built:
                continue
            beyond = [k for k in built if k >= self._folds]
            if beyond or (whole is not pipeline and len(built) != self._folds):
                raise ParameterError(
                    f"cv.folds is {self._folds}, but this run's pipeline holds the namespaces "
                    f"{', '.join(fold_name(k) for k in built)}: Kedro builds cassava_cv's folds "
                    "from the parameter files (conf/base and the environment KEDRO_ENV names) "
                    "before it reads --params. Set cv.folds in conf/<env>/parameters_cv.yml and "
                    "run with KEDRO_ENV=<env>."
                )


def folds_of(pipeline) -> list[int]:
    """The cross-validation folds a pipeline holds (its ``fold_<k>`` namespaces), in order."""
    return sorted({k for n in pipeline.nodes if (k := fold_number(n.namespace)) is not None})


def registered(names: list[str]) -> list:
    """The project's registered pipelines of these names (Kedro's public registry)."""
    from kedro.framework.project import pipelines  # noqa: PLC0415  (after configure_project)

    try:
        return [pipelines[n] for n in names if n in pipelines]
    except Exception:  # no project configured (a pipeline run outside a session)
        return []


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
            mlflow.log_metrics({f"seconds/{name}": round(sec, 3) for name, sec in times.items()})
