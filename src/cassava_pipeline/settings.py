"""Kedro project settings."""

from cassava_pipeline.config import LOADER_ARGS, ProjectConfigLoader
from cassava_pipeline.hooks import (
    DistributedHooks,
    FoldRunsHooks,
    KedroMlflowHooks,
    MirrorEndHooks,
    NodeTimesHooks,
    ParametersHooks,
    RunLockHooks,
    TrackingHooks,
)

# OmegaConfigLoader plus ${env_folder:}: each environment's outputs in folders of their own.
CONFIG_LOADER_CLASS = ProjectConfigLoader
CONFIG_LOADER_ARGS = LOADER_ARGS

# kedro-mlflow's hook is registered here, not through its plugin entry point, so that under
# torchrun rank 0 alone records the run. Ours complete its run (tags, interrupted runs), allow
# one run at a time per project and environment, and send the whole run to the tracking server
# it is mirrored to once kedro-mlflow has ended it (cassava_pipeline.fallback). Registered
# last, kedro-mlflow's hook is called first, as a plugin's would be.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow", "kedro-mlflow")
# DistributedHooks: under torchrun, the process group every rank shares from the start.
HOOKS = (
    DistributedHooks(),
    RunLockHooks(),
    TrackingHooks(),
    FoldRunsHooks(),  # one nested MLflow run per cross-validation fold
    NodeTimesHooks(),
    MirrorEndHooks(),
    KedroMlflowHooks(),
    ParametersHooks(),  # registered last, called first: nothing starts with bad parameters
)
