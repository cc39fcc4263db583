"""Kedro project settings."""

from cassava_pipeline.config import LOADER_ARGS, ProjectConfigLoader
from cassava_pipeline.hooks import RunLockHooks, TrackingHooks

# OmegaConfigLoader plus ${env_folder:}: each environment's outputs in folders of their own.
CONFIG_LOADER_CLASS = ProjectConfigLoader
CONFIG_LOADER_ARGS = LOADER_ARGS

# kedro-mlflow's hooks register themselves (plugin entry point); ours complete its run, and
# allow one run at a time per project and environment.
HOOKS = (RunLockHooks(), TrackingHooks())
