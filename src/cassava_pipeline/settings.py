"""Kedro project settings."""

from cassava_pipeline.config import LOADER_ARGS, ProjectConfigLoader
from cassava_pipeline.hooks import (
    DistributedHooks,
    FailoverEndHooks,
    KedroMlflowHooks,
    NodeTimesHooks,
    ParametersHooks,
    RunLockHooks,
    TrackingHooks,
)

# OmegaConfigLoader plus ${env_folder:}: each environment's outputs in folders of their own.
CONFIG_LOADER_CLASS = ProjectConfigLoader
CONFIG_LOADER_ARGS = LOADER_ARGS

# kedro-mlflow's hook is registered here, wrapped so that a tracking server that stops answering
# moves the run to the local store instead of failing it (cassava_pipeline.fallback), not
# through its plugin entry point. Ours complete its run (tags, interrupted runs), allow one run
# at a time per project and environment, and disarm the failover after kedro-mlflow has ended
# the run. Registered last, kedro-mlflow's hook is called first, as a plugin's would be.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow", "kedro-mlflow")
# DistributedHooks: under torchrun, the process group every rank shares from the start.
HOOKS = (
    DistributedHooks(),
    RunLockHooks(),
    TrackingHooks(),
    NodeTimesHooks(),
    FailoverEndHooks(),
    KedroMlflowHooks(),
    ParametersHooks(),  # registered last, called first: nothing starts with bad parameters
)
