"""Environments side by side: each one's outputs in its own folders; its merged parameters."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from cassava_pipeline.config import LOADER_ARGS, ProjectConfigLoader, env_folder, main
from tests.images import REPO


def _paths(catalog_conf: dict) -> dict[str, str]:
    """Dataset name -> the path it reads or writes (inside wrappers such as MLflow's)."""
    out = {}
    for name, entry in catalog_conf.items():
        if not isinstance(entry, dict) or name.startswith("_"):
            continue
        inner = entry.get("dataset") if isinstance(entry.get("dataset"), dict) else {}
        path = entry.get("path") or entry.get("filepath") or inner.get("filepath")
        if path:
            out[name] = str(path)
    return out


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """The project's conf/ plus a user's own environment, conf/gpu (a parameter file only)."""
    root = tmp_path / "conf"
    shutil.copytree(REPO / "conf", root, ignore=shutil.ignore_patterns("local"))
    (root / "local").mkdir()
    (root / "gpu").mkdir()
    (root / "gpu" / "parameters.yml").write_text("runtime:\n  precision: bf16-mixed\n")
    return root


def test_every_output_lives_in_its_environments_folder(conf: Path):
    paths = {
        env: _paths(ProjectConfigLoader(str(conf), env=env, **LOADER_ARGS)["catalog"])
        for env in (None, "kaggle", "gpu")
    }
    assert env_folder(None) == env_folder("local") == "" and env_folder("gpu") == "gpu/"
    outputs = [n for n, p in paths[None].items() if not p.startswith("data/01_raw/")]
    # checkpoints, resume folders, model, shards, reports, figures, metrics, predictions
    assert {
        "{stage}.checkpoint",
        "{stage}.resume_dir",
        "lr_find_resume_dir",
        "exported_model",
    } <= set(outputs)
    assert {"metrics", "{name}_plot", "submission", "{namespace}.presized_images"} <= set(outputs)
    for env in ("kaggle", "gpu"):
        for name in outputs:
            default, own = paths[None][name], paths[env][name]
            layer, rest = default.split("/", 2)[1:]
            assert own == f"data/{layer}/{env}/{rest}", (env, name)
    # inputs: the sample stays shared; kaggle reads the competition's folder
    assert paths["gpu"]["raw_images"] == paths[None]["raw_images"] == "data/01_raw/cassava_sample"
    assert paths["kaggle"]["raw_images"] == "data/01_raw/cassava-leaf-disease-classification"


def test_the_project_session_resolves_environment_folders():
    """Through Kedro itself (settings.py's loader), as `kedro run --env=kaggle` sees it."""
    bootstrap_project(REPO)
    seen = {}
    for env in (None, "kaggle"):
        with KedroSession.create(project_path=REPO, env=env) as session:
            context = session.load_context()
            catalog = context.catalog
            seen[env] = {
                name: str(Path(catalog.get(name)._describe()["path"]).relative_to(REPO))
                for name in ("mixup.checkpoint", "frozen.resume_dir", "exported_model")
            }
            # the ingest error names the data report where this environment writes it
            report = context.params["ingest"]["report_path"]
            assert report == ("data/08_reporting/kaggle/data_report.json" if env else
                              "data/08_reporting/data_report.json")  # fmt: skip
            if env == "kaggle":
                context.config_loader.config_patterns.setdefault("mlflow", ["mlflow*"])
                mlflow = context.config_loader["mlflow"]
                assert mlflow["tracking"]["experiment"]["name"] == "cassava_pipeline_kaggle"
                assert mlflow["server"]["mlflow_tracking_uri"] == "sqlite:///mlflow.db"
    assert seen[None]["mixup.checkpoint"] == "data/06_models/mixup.pt"
    assert seen["kaggle"] == {
        "mixup.checkpoint": "data/06_models/kaggle/mixup.pt",
        "frozen.resume_dir": "data/06_models/kaggle/resume/frozen",
        "exported_model": "data/06_models/kaggle/model.safetensors",
    }


def test_merged_parameters_for_dvc(conf: Path, tmp_path: Path):
    files = {}
    for env in ("local", "kaggle", "gpu"):
        files[env] = tmp_path / env / "parameters.yml"
        main(["--conf", str(conf), "--env", env, "--out", str(files[env])])
    local, kaggle, gpu = (yaml.safe_load(files[e].read_text()) for e in ("local", "kaggle", "gpu"))
    assert local["small"]["presize"]["size"] == 160 and local["frozen"]["train"]["epochs"] == 3
    # conf/kaggle overrides key by key; the rest of conf/base stays
    assert kaggle["small"]["presize"]["size"] == 460 and kaggle["frozen"]["train"]["epochs"] == 15
    assert kaggle["frozen"]["train"]["wd"] == local["frozen"]["train"]["wd"] == 0.01
    assert gpu["runtime"]["precision"] == "bf16-mixed" and gpu["runtime"]["devices"] == 1
    # the merged catalog is covered by its digest: kaggle reads other raw images
    assert len(local["catalog_digest"]) == 64
    assert kaggle["catalog_digest"] != local["catalog_digest"]
    assert gpu["catalog_digest"] != local["catalog_digest"]  # its outputs live under gpu/


def test_a_test_session_keeps_no_passed_tests_folders():
    """A whole session writes ~15 GB of pipeline outputs; pytest's default keeps every test's
    folder for three sessions, which once filled CI's disk. Only failures are kept."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    ini = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["tmp_path_retention_policy"] == "failed"
    assert int(ini["tmp_path_retention_count"]) <= 1
