"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from cassava_pipeline.hooks import TrackingHooks

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment (conf/kaggle) overrides parameters key by key instead of whole sections.
    "merge_strategy": {"parameters": "soft"},
}

# kedro-mlflow's hooks register themselves (plugin entry point); ours complete its run.
HOOKS = (TrackingHooks(),)
