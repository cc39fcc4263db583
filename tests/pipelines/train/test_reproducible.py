"""Same seed, same data, same code: the same checkpoints, byte for byte, and the same metrics."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from kedro.runner import SequentialRunner

from cassava_pipeline.pipeline_registry import register_pipelines
from tests.pipelines.conftest import make_catalog, shrink_training

FILES = (
    "initial.pt",
    "frozen.pt",
    "unfrozen.pt",
    "mixup.pt",
    "model.safetensors",
    "metrics.json",
    "interpretation.json",
    "lr_find.json",
)


def output_digests(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in FILES}


@pytest.mark.slow
def test_two_seeded_runs_write_identical_files(kaggle_dir: Path, params, tmp_path: Path):
    params = shrink_training(params)
    digests = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        catalog = make_catalog(kaggle_dir, params, out)
        SequentialRunner().run(register_pipelines()["cassava"], catalog)
        digests.append(output_digests(out))
    assert digests[0] == digests[1]
