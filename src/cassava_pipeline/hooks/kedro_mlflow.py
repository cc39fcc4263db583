"""kedro-mlflow's hook as this project registers it (``settings.py``): on rank 0 only."""

from __future__ import annotations

import warnings
from typing import Any

from kedro.framework.hooks import hook_impl

from cassava_pipeline.vision.dist import rank


class KedroMlflowHooks:
    """kedro-mlflow's own hook, on rank 0 only under torchrun (one MLflow run per job).

    ``settings.py`` disables the plugin's registration and registers this instead. Its other
    ranks switch kedro-mlflow's datasets off (they would open runs of their own).
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

    @hook_impl
    def after_context_created(self, context) -> None:
        if rank() == 0:
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

            switch_catalog_logging(catalog, False)
            return
        self._inner.before_pipeline_run(run_params, pipeline, catalog)

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        # conf/base/mlflow.yml's `nested: false`: the run this thread holds is not stacked
        # once more per node (kedro-mlflow reopens it for runners of other threads)
        if rank() == 0:
            self._inner.before_node_run(node, catalog, inputs, is_async)

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        if rank() == 0:
            self._inner.after_pipeline_run(run_params, pipeline, catalog)

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        if rank() == 0:
            self._inner.on_pipeline_error(error, run_params, pipeline, catalog)
