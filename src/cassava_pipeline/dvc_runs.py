"""One MLflow run per ``dvc repro`` or ``dvc exp run``, its stages nested under it.

Each DVC stage is a ``kedro run`` of its own, so each would be a separate MLflow run holding part
of the parameters and part of the metrics. When a run starts under DVC (DVC sets ``DVC_STAGE``
for every stage command), :func:`invocation` says which DVC command it belongs to:

- ``dvc exp run``: DVC passes the experiment's name and baseline commit to every stage
  (``DVC_EXP_NAME``, ``DVC_EXP_BASELINE_REV``), and they are the key;
- ``dvc repro``: the ``dvc`` process the stages run under (its pid and start time), found among
  this process's parents with psutil.

:func:`open_parent` finds the parent run with that key in the experiment, or creates it with
every merged parameter of the environment, and the stage's run is tagged as its child
(``mlflow.parentRunId``, MLflow's own nesting tag) and named after its stage. At the end of each
stage :func:`close_stage` copies the stage's metrics to the parent (histories with their steps,
``final_metrics.*`` from evaluate; the stage's wall time as ``seconds/<stage>``) and its provenance
tags, and sets the parent's status to the stage's. In the runs table an experiment is then one
row with its parameters and results side by side, its stages folded under it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

PARENT_TAG = "mlflow.parentRunId"  # MLflow's system tag: the UI nests a run under that run
KEY_TAG = "dvc.invocation"
STAGE_TAG = "dvc.stage"
# what a stage records about itself only (its process, its own time, its mirror on a server):
# not the experiment's
_OWN_TAGS = ("mlflow.", "dvc.stage", "pid", "host", "kedro_pipeline", "fail", "cassava.")
_BATCH = 900  # MLflow takes up to 1000 metrics, 100 params per log_batch


@dataclass(frozen=True)
class Invocation:
    """The DVC command a stage's run belongs to."""

    stage: str  # DVC's stage name, e.g. ``train`` (``dvc.yaml:train`` -> ``train``)
    key: str  # the same for every stage of one command
    title: str  # the parent run's name starts with it: the experiment's name, or ``dvc repro``
    experiment: str | None = None
    baseline: str | None = None


def _dvc_parent() -> psutil.Process | None:
    """The ``dvc`` command this process runs under, if any."""
    try:
        for proc in psutil.Process().parents():
            args = proc.cmdline()
            if any(os.path.basename(a) == "dvc" for a in args[:2]) or args[1:3] == ["-m", "dvc"]:
                return proc
    except (psutil.Error, OSError):
        return None
    return None


def invocation(environ: Mapping[str, str] | None = None) -> Invocation | None:
    """The DVC command this run is a stage of, or None outside DVC."""
    env = os.environ if environ is None else environ
    stage = env.get("DVC_STAGE")
    if not stage:
        return None
    stage = stage.rsplit(":", 1)[-1]  # "dvc.yaml:train" in a nested dvc.yaml
    name, baseline = env.get("DVC_EXP_NAME"), env.get("DVC_EXP_BASELINE_REV")
    if name:
        return Invocation(stage, f"exp:{name}:{baseline or ''}", name, name, baseline)
    dvc = _dvc_parent()
    if dvc is None:  # a stage's command run by hand: a run of its own
        return None
    key = f"repro:{socket.gethostname()}:{dvc.pid}:{dvc.create_time():.3f}"
    return Invocation(stage, key, "dvc repro")


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as kedro-mlflow logs them (``frozen.train.epochs``), as strings."""
    out: dict[str, str] = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = str(v)
    return out


def open_parent(
    client: MlflowClient,
    experiment_id: str,
    inv: Invocation,
    name: str,
    params: Mapping[str, Any],
) -> str:
    """The id of the parent run of ``inv`` (created with ``params`` if it is the first stage),
    marked RUNNING while a stage runs."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{inv.key}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {KEY_TAG: inv.key}
    if inv.experiment:
        tags["dvc.experiment"] = inv.experiment
        tags["dvc.baseline_rev"] = inv.baseline or ""
    run = client.create_run(experiment_id, run_name=f"{inv.title}: {name}", tags=tags)
    flat = flatten(params)
    short = [Param(k, v) for k, v in flat.items() if len(v) <= MAX_PARAM_VAL_LENGTH]
    for i in range(0, len(short), 100):
        client.log_batch(run.info.run_id, params=short[i : i + 100])
    return run.info.run_id


def close_stage(client: MlflowClient, parent_id: str, child_id: str, stage: str, status: str):
    """Copy the stage's metrics and provenance to the parent; the parent takes ``status``."""
    child = client.get_run(child_id)
    metrics: list[Metric] = []
    for key in child.data.metrics:
        if key.startswith("system/"):  # the stage's own machine readings
            continue
        target = f"seconds/{stage}" if key == "seconds/run" else key
        for m in client.get_metric_history(child_id, key):
            metrics.append(Metric(target, m.value, m.timestamp, m.step))
    for i in range(0, len(metrics), _BATCH):
        client.log_batch(parent_id, metrics=metrics[i : i + _BATCH])
    for key, value in child.data.tags.items():
        if not key.startswith(_OWN_TAGS):
            client.set_tag(parent_id, key, value)
    client.set_tag(parent_id, "dvc.last_stage", stage)
    client.set_terminated(parent_id, status=status)
