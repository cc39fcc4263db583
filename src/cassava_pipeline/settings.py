"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from cassava_pipeline.hooks import TrackingHooks

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment (conf/kaggle, conf/local) overrides parameters and MLflow settings key by
    # key instead of whole sections: conf/local/mlflow.yml names only the tracking server.
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}

# kedro-mlflow's hooks register themselves (plugin entry point); ours complete its run.
HOOKS = (TrackingHooks(),)
