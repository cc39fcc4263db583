"""Fixtures for pipeline tests: the project's real parameters, shrunk where a test needs it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro_datasets.json import JSONDataset

from cassava_pipeline.datasets import ImageShardsDataset
from tests.images import REPO


@pytest.fixture(scope="session")
def base_params() -> dict:
    """conf/base parameters, as kedro loads them."""
    loader = OmegaConfigLoader(str(REPO / "conf"), base_env="base", default_run_env="base")
    return loader["parameters"]


@pytest.fixture
def params(base_params) -> dict:
    p = copy.deepcopy(base_params)
    for ns in ("small", "large"):
        p[ns]["presize"]["workers"] = 1
    p["ingest"]["workers"] = 1
    return p


def make_catalog(raw: Path, params: dict, out: Path) -> DataCatalog:
    """An in-memory catalog: raw folder and parameters in, shards written under ``out``."""
    datasets = {
        "raw_images": MemoryDataset(raw, copy_mode="assign"),
        # On disk, as in the project's catalog: the report must survive a stopped run.
        "data_report": JSONDataset(filepath=str(out / "data_report.json")),
    }
    for ns in ("small", "large"):
        datasets[f"{ns}.presized_images"] = ImageShardsDataset(path=str(out / ns))
    catalog = DataCatalog(datasets)

    def add(prefix: str, value) -> None:
        catalog[prefix] = MemoryDataset(value, copy_mode="assign")
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}", v)

    for key, value in params.items():
        add(f"params:{key}", value)
    return catalog
