"""MLflow tracking pieces on a throw-away SQLite store: epoch logging, tags, the pyfunc model.

The mirror on a tracking server is in test_fallback.py, the hooks in tests/hooks/.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cassava_pipeline.datasets import MlflowPyfuncModelDataset
from cassava_pipeline.tracking import EpochLogger, frame_hash, run_tags
from tests.images import REPO
from tests.training import exported


def _row(epoch: int, acc: float) -> dict:
    return {"stage": "s", "epoch": epoch, "train_loss": 1.0, "valid_loss": 0.5, "accuracy": acc,
            "lr": 1e-3}  # fmt: skip


def test_epoch_logger_uses_global_steps_and_fills_gaps(store):
    uri, exp = store
    with mlflow.start_run(experiment_id=exp) as run:
        tracker = EpochLogger.for_active_run(offset=3)
        assert tracker is not None and tracker.run_id == run.info.run_id
        tracker(_row(0, 0.5))  # live, as the training loop calls it
        history = pd.DataFrame([_row(0, 0.5), _row(1, 0.75)])
        assert tracker.log_missing(history) == 1  # epoch 0 was logged already
    client = MlflowClient(uri)
    acc = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in acc] == [(3, 0.5), (4, 0.75)]
    assert {"train_loss", "valid_loss", "lr"} <= set(client.get_run(run.info.run_id).data.metrics)
    assert EpochLogger.for_active_run(offset=0) is None  # no run, no logging


def test_a_cv_folds_curves_keep_their_own_names_in_a_run_without_fold_runs(store):
    uri, exp = store
    with mlflow.start_run(experiment_id=exp) as run:
        for fold, acc in (("fold_0/", 0.25), ("fold_1/", 0.75)):
            tracker = EpochLogger.for_active_run(offset=0, fold=fold.rstrip("/"))
            tracker(_row(0, acc))
            assert tracker.log_missing(pd.DataFrame([_row(0, acc), _row(1, acc)])) == 1
    client = MlflowClient(uri)
    for fold, acc in (("fold_0", 0.25), ("fold_1", 0.75)):
        history = client.get_metric_history(run.info.run_id, f"{fold}/accuracy")
        assert [(m.step, m.value) for m in history] == [(0, acc), (1, acc)]
    assert "accuracy" not in client.get_run(run.info.run_id).data.metrics


def test_a_store_that_cannot_be_written_warns_once_and_never_raises(tmp_path, caplog):
    tracker = EpochLogger(f"sqlite:///{tmp_path / 'no' / 'such' / 'folder.db'}", "no-run", 0)
    with caplog.at_level(logging.WARNING):
        tracker(_row(0, 0.5))
        tracker(_row(1, 0.6))
    assert tracker.disabled
    assert sum("could not record epoch metrics" in r.message for r in caplog.records) == 1


def test_run_tags_and_data_hash():
    tags = run_tags(REPO, "cpu")
    assert len(tags["git_commit"]) == 40 or tags["git_commit"].startswith("unknown")
    assert tags["git_dirty"] in ("true", "false", "unknown")
    assert len(tags["lock_hash"]) == 64 and tags["device"].startswith("cpu")
    assert tags["torch_version"].startswith("2.") and "version.mlflow" in tags
    a = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "hash": ["1", "2"]})
    assert frame_hash(a) == frame_hash(a.copy())
    assert frame_hash(a) != frame_hash(a.iloc[::-1].reset_index(drop=True))
    assert frame_hash(a) != frame_hash(a.assign(hash=["1", "3"]))


def test_pyfunc_model_takes_paths_bytes_and_base64(store, test_images: Path):
    _, exp = store
    dataset = MlflowPyfuncModelDataset(name="model")
    dataset.save(exported())  # no active run: a warning, nothing logged
    assert not dataset.exists()
    with mlflow.start_run(experiment_id=exp):
        dataset.save(exported())
    model = dataset.load()
    good = test_images / "0.jpg"
    png = (test_images / "rgba.png").read_bytes()
    frame = pd.DataFrame(
        {
            "image": [
                str(good),
                png,
                "base64:" + base64.b64encode(good.read_bytes()).decode(),
                str(test_images / "corrupt.jpg"),
            ]
        }
    )
    out = model.predict(frame)
    assert list(out.columns) == [
        "label",
        "class_name",
        "probability",
        "p_0",
        "p_1",
        "p_2",
        "error",
    ]
    assert out["label"].iloc[:3].isin(["0", "1", "2"]).all()
    assert out["label"].iat[0] == out["label"].iat[2]  # the same image, as path and as base64
    assert out["probability"].iat[0] == pytest.approx(out["probability"].iat[2])
    assert out["label"].iat[3] == "" and out["error"].iat[3]
    assert (out["error"].iloc[:3] == "").all()
    # the logged model describes its columns and carries a request a client can send
    info = mlflow.models.get_model_info(dataset._uri)
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == list(out.columns)
    local = mlflow.artifacts.download_artifacts(dataset._uri)
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert example["image"].iat[0].startswith("base64:")
    assert model.predict(example)["label"].iat[0] in {"0", "1", "2"}


def test_pyfunc_requirements_cover_every_package_the_model_imports():
    """``mlflow models serve`` with its default environment manager builds the environment from
    the requirements alone: every distribution the model's own code imports at module level (the
    modules of this package that loading the model loads) must be pinned there, or be a
    requirement of one that is. (Optional imports inside third-party packages are theirs.)"""
    import ast
    import json
    import subprocess
    import sys
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from cassava_pipeline.datasets.mlflow_model import PYFUNC_REQUIREMENTS, _requirements

    code = (
        "import json, sys; import cassava_pipeline.mlflow_model; print(json.dumps(sorted("
        "m.__file__ for n, m in list(sys.modules.items()) "
        "if n.split('.')[0] == 'cassava_pipeline' and getattr(m, '__file__', None))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(f.endswith("vision/models.py") for f in files)
    tops: set[str] = set()
    for file in files:
        for node in ast.parse(Path(file).read_text()).body:  # module level: run at import
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
    owners = metadata.packages_distributions()
    imported = {canonicalize_name(d) for t in tops for d in owners.get(t, [])}
    covered: set[str] = set()
    todo = [canonicalize_name(r.split("==")[0]) for r in _requirements()]
    while todo:
        name = todo.pop()
        if name in covered:
            continue
        covered.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    missing = imported - covered - {canonicalize_name("cassava-pipeline")}
    assert not missing, f"add to PYFUNC_REQUIREMENTS ({PYFUNC_REQUIREMENTS}): {sorted(missing)}"
    assert {"torch", "timm", "safetensors"} <= imported  # the scan sees the model's own imports


def test_dvc_invocation_is_read_from_what_dvc_passes_its_stages():
    from cassava_pipeline.dvc_runs import flatten, invocation

    assert invocation({}) is None  # not under DVC
    exp = {
        "DVC_STAGE": "sub/dvc.yaml:train",
        "DVC_EXP_NAME": "lucid-owl",
        "DVC_EXP_BASELINE_REV": "ab12",
    }
    inv = invocation(exp)
    assert (inv.stage, inv.key, inv.title, inv.baseline) == (
        "train",
        "exp:lucid-owl:ab12",
        "lucid-owl",
        "ab12",
    )
    assert invocation({**exp, "DVC_EXP_NAME": "other"}).key != inv.key
    # a stage command run by hand (no dvc process above this one): a run of its own
    assert invocation({"DVC_STAGE": "train"}) is None
    assert flatten({"frozen": {"train": {"epochs": 3, "lr": None}}, "tags": [], "n": {}}) == {
        "frozen.train.epochs": "3",
        "frozen.train.lr": "None",
        "tags": "[]",
        "n": "{}",
    }
