"""Reruns of the cassava pipeline on the shrunk sample: every stage is reused while its inputs
hold, and retrains, saying why, as soon as one changes. Nothing stale is ever evaluated."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from kedro.runner import SequentialRunner

from cassava_pipeline.pipeline_registry import register_pipelines
from cassava_pipeline.vision import provenance
from cassava_pipeline.vision.export import load_exported
from cassava_pipeline.vision.shards import ShardedImages
from tests.conftest import write_kaggle_dir
from tests.pipelines.conftest import make_catalog, shrink_training
from tests.pipelines.train.test_reproducible import output_digests

STAGE_NAMES = ("frozen", "unfrozen", "mixup")


def _run(raw: Path, params: dict, out: Path, caplog) -> str:
    caplog.clear()
    caplog.set_level(logging.INFO, logger="cassava_pipeline")
    SequentialRunner().run(register_pipelines()["cassava"], make_catalog(raw, params, out))
    return caplog.text


def _line(stage: str, out: Path, reason: str) -> str:
    return f"{stage}: {out / 'resume' / stage / 'last.pt'} {reason}; training from the start"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, base_params) -> dict:
    """One full run of the pipeline; each test reruns a copy of its output folder."""
    tmp = tmp_path_factory.mktemp("invalidation")
    raw = write_kaggle_dir(tmp / "kaggle")
    params = copy.deepcopy(base_params)
    for ns in ("small", "large"):
        params[ns]["presize"]["workers"] = 1
    params["ingest"]["workers"] = 1
    params = shrink_training(params)
    out = tmp / "out"
    SequentialRunner().run(register_pipelines()["cassava"], make_catalog(raw, params, out))
    return {"raw": raw, "params": params, "out": out, "digests": output_digests(out)}


@pytest.fixture
def rerun(first_run, tmp_path: Path, caplog):
    """rerun(change) -> (log, out): the pipeline again, on a copy of the first run's outputs,
    with ``change(params)`` applied."""
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)

    def go(change=None) -> tuple[str, Path]:
        params = copy.deepcopy(first_run["params"])
        if change is not None:
            change(params)
        return _run(first_run["raw"], params, out, caplog), out

    return go


def _assert_trained_on_current_split(out: Path) -> None:
    """Every stage's checkpoint records the shards it trained on: those of the manifest actually
    used now, whose validation side shares no image (by content hash) with its training side."""
    manifest = pd.read_parquet(out / "large" / "index.parquet")
    valid = manifest["is_valid"].astype(bool)
    assert set(manifest.loc[valid, "hash"]).isdisjoint(manifest.loc[~valid, "hash"])
    for stage, shards in (("frozen", "small"), ("unfrozen", "large"), ("mixup", "large")):
        ckpt = torch.load(out / f"{stage}.pt", map_location="cpu", weights_only=True)
        current = ShardedImages(out / shards)
        assert ckpt["trained_on"] == current.content, stage
        assert (current.index["is_valid"].to_numpy() == valid.to_numpy()).all()


@pytest.mark.slow
def test_nothing_changed_reuses_every_stage_bit_for_bit(first_run, rerun):
    log, out = rerun()
    for stage in STAGE_NAMES:
        assert f"{stage}: {out / 'resume' / stage / 'last.pt'} holds this run" in log
    assert log.count("finished; reusing it") == 3
    assert "holds this sweep (same inputs)" in log and "training from the start" not in log
    assert output_digests(out) == first_run["digests"]


@pytest.mark.slow
def test_a_new_split_retrains_every_stage_and_evaluates_unseen_images(first_run, rerun):
    old_split = ShardedImages(first_run["out"] / "large").index["is_valid"].to_numpy()
    log, out = rerun(lambda p: p["split"].update(seed=7))
    new_split = ShardedImages(out / "large").index["is_valid"].to_numpy()
    assert (old_split != new_split).any()  # the stratified split keeps counts, not images
    assert old_split.sum() == new_split.sum()
    for stage in STAGE_NAMES:  # both shard sets hold the new split
        assert _line(stage, out, "was trained on other shards (split changed)") in log
    assert "lr_find: " in log and "other shards (split changed); sweeping again" in log
    assert "reusing it" not in log
    _assert_trained_on_current_split(out)


@pytest.mark.slow
def test_a_new_presize_retrains_from_the_stage_that_reads_it(first_run, rerun):
    log, out = rerun(lambda p: p["large"]["presize"].update(size=44))
    assert "frozen: " in log and log.count("finished; reusing it") == 1  # small shards: same
    reason = "was trained on other shards (presize changed, pixels changed)"
    assert _line("unfrozen", out, reason) in log and _line("mixup", out, reason) in log
    _, card = load_exported(out / "model.safetensors")
    assert card.presize == 44
    _assert_trained_on_current_split(out)


@pytest.mark.slow
def test_another_precision_retrains_every_stage(rerun):
    log, out = rerun(lambda p: p["runtime"].update(precision="bf16-mixed"))
    reason = "was trained at another precision (32-true -> bf16-mixed)"
    assert all(_line(stage, out, reason) in log for stage in STAGE_NAMES), log[-3000:]
    assert f"lr_find: {out / 'resume' / 'lr_find' / 'lr_find.json'} {reason}" in log
    assert "reusing it" not in log
    _assert_trained_on_current_split(out)


@pytest.mark.slow
def test_edited_augmentation_code_retrains_every_stage(rerun, monkeypatch):
    edited = {**provenance.code_digests(), "augment.py": "0" * 32}  # one line changed
    monkeypatch.setattr(provenance, "code_digests", lambda: edited)
    log, out = rerun()
    reason = "was trained by other code (augment.py changed)"
    assert all(_line(stage, out, reason) in log for stage in STAGE_NAMES), log[-3000:]
    assert "reusing it" not in log
    _assert_trained_on_current_split(out)


@pytest.mark.slow
def test_evaluate_refuses_a_model_trained_on_other_shards(first_run, tmp_path: Path):
    """Data rerun with a new split, training not: evaluation stops instead of scoring images the
    model trained on."""
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    params = copy.deepcopy(first_run["params"])
    params["split"]["seed"] = 7
    pipes = register_pipelines()
    catalog = make_catalog(first_run["raw"], params, out)
    SequentialRunner().run(pipes["data"], catalog)
    with pytest.raises(ValueError, match=r"trained on other shards .*\(split changed\).*"):
        SequentialRunner().run(pipes["evaluate"], catalog)
