"""Fixtures for pipeline tests: the project's real parameters, shrunk where a test needs it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from kedro.framework.hooks.specs import DatasetSpecs, NodeSpecs, PipelineSpecs
from kedro.io import DataCatalog, MemoryDataset
from pluggy import PluginManager

from cassava_pipeline.config import ProjectConfigLoader
from cassava_pipeline.datasets import (
    CheckpointDataset,
    ExportedModelDataset,
    ImageShardsDataset,
    WorkDirDataset,
)
from cassava_pipeline.datasets.atomic import CSVDataset, JSONDataset, MatplotlibDataset
from tests.images import REPO


@pytest.fixture(scope="session")
def base_params() -> dict:
    """conf/base parameters, as kedro loads them (the project's loader: ``${env_folder:}``)."""
    loader = ProjectConfigLoader(str(REPO / "conf"), base_env="base", default_run_env="base")
    return loader["parameters"]


@pytest.fixture
def params(base_params) -> dict:
    p = copy.deepcopy(base_params)
    for ns in ("small", "large"):
        p[ns]["presize"]["workers"] = 1
    p["ingest"]["workers"] = 1
    return p


PLOTS = ("confusion_matrix", "top_losses", "training_curves", "lr_find", "show_batch")


def make_catalog(
    raw: Path, params: dict, out: Path, predict_folder: Path | None = None
) -> DataCatalog:
    """An in-memory catalog: raw folder and parameters in; shards, checkpoints under ``out``."""
    datasets = {
        "raw_images": MemoryDataset(raw, copy_mode="assign"),
        "predict_images": MemoryDataset(predict_folder, copy_mode="assign"),
        "exported_model": ExportedModelDataset(path=str(out / "model.safetensors")),
        # predict.model null: cassava_predict reads the exported model (conf/base/catalog.yml)
        "predict_model": ExportedModelDataset(path=str(out / "model.safetensors")),
        "submission": CSVDataset(filepath=str(out / "submission.csv"), save_args={"index": False}),
        "test_predictions": CSVDataset(
            filepath=str(out / "test_predictions.csv"), save_args={"index": False}
        ),
        "predict_report": JSONDataset(filepath=str(out / "predict_report.json")),
        # On disk, as in the project's catalog: the report must survive a stopped run.
        "data_report": JSONDataset(filepath=str(out / "data_report.json")),
        "initial_checkpoint": CheckpointDataset(path=str(out / "initial.pt")),
        "lr_find_result": JSONDataset(filepath=str(out / "lr_find.json")),
        "metrics": JSONDataset(filepath=str(out / "metrics.json")),
        "interpretation": JSONDataset(filepath=str(out / "interpretation.json")),
        **{
            f"{name}_plot": MatplotlibDataset(
                filepath=str(out / f"{name}.png"), save_args={"dpi": 100}
            )
            for name in PLOTS
        },
    }
    for ns in ("small", "large"):
        datasets[f"{ns}.presized_images"] = ImageShardsDataset(path=str(out / ns))
    datasets["lr_find_resume_dir"] = WorkDirDataset(path=str(out / "resume" / "lr_find"))
    for stage in ("frozen", "unfrozen", "mixup"):
        datasets[f"{stage}.checkpoint"] = CheckpointDataset(path=str(out / f"{stage}.pt"))
        datasets[f"{stage}.resume_dir"] = WorkDirDataset(path=str(out / "resume" / stage))
        datasets[f"{stage}.history"] = CSVDataset(
            filepath=str(out / f"history_{stage}.csv"), save_args={"index": False}
        )
    catalog = DataCatalog(datasets)

    def add(prefix: str, value) -> None:
        catalog[prefix] = MemoryDataset(value, copy_mode="assign")
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}", v)

    for key, value in params.items():
        add(f"params:{key}", value)
    return catalog


def shrink_training(params: dict, *, arch: str = "tf_efficientnet_lite0") -> dict:
    """The demo recipe at test size: tiny images, one epoch per stage, no progress bars."""
    params["model"]["arch"] = arch
    params["model"]["weights"] = "packaged" if arch == "tf_efficientnet_lite0" else "none"
    params["small"]["presize"]["size"] = 36
    params["large"]["presize"]["size"] = 40
    params["runtime"].update(accelerator="cpu", progress=False)
    params["lr_find"]["num_it"] = 12
    params["tta"]["n"] = 2
    for stage in ("frozen", "unfrozen", "mixup"):
        p = params[stage]["train"]
        p.update(epochs=1, size=32)
        p["loader"].update(batch_size=4, num_workers=0)
    return params


def hook_manager(*hooks) -> PluginManager:
    """Kedro's hook specifications with ``hooks`` registered, for a runner's ``hook_manager``
    (the session's before/after_pipeline_run are then the test's to call)."""
    manager = PluginManager("kedro")
    for spec in (NodeSpecs, PipelineSpecs, DatasetSpecs):
        manager.add_hookspecs(spec)
    for hook in hooks:
        manager.register(hook)
    return manager
