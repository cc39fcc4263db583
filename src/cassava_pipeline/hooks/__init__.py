"""The project's Kedro hooks (registered in ``settings.py``).

- :mod:`.run`: one ``kedro run`` at a time per project and environment, the process group
  under torchrun, every parameter checked before anything runs, each node's time;
- :mod:`.kedro_mlflow`: kedro-mlflow's own hook, on rank 0 only under torchrun;
- :mod:`.mlflow_run`: kedro-mlflow's run completed: provenance tags, the data inputs, runs
  interrupted by a signal or left RUNNING by a dead process, and the run's mirror on a tracking
  server (:mod:`cassava_pipeline.fallback`);
- :mod:`.fold_runs`: one nested MLflow run per cross-validation fold under the run.
"""

from cassava_pipeline.hooks.fold_runs import FoldRunsHooks
from cassava_pipeline.hooks.kedro_mlflow import KedroMlflowHooks
from cassava_pipeline.hooks.mlflow_run import (
    MirrorEndHooks,
    TrackingHooks,
    mark_dead_runs_killed,
)
from cassava_pipeline.hooks.run import (
    DistributedHooks,
    NodeTimesHooks,
    ParametersHooks,
    RunLockHooks,
)

__all__ = [
    "DistributedHooks",
    "FoldRunsHooks",
    "KedroMlflowHooks",
    "MirrorEndHooks",
    "NodeTimesHooks",
    "ParametersHooks",
    "RunLockHooks",
    "TrackingHooks",
    "mark_dead_runs_killed",
]
