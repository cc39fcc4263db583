"""The parameters' schema: every file checked at the start, every problem named at once."""

from __future__ import annotations

import copy
import time

import pytest

from cassava_pipeline import params as schema
from cassava_pipeline.config import LOADER_ARGS, ProjectConfigLoader
from cassava_pipeline.params import ParameterError, check_parameters
from cassava_pipeline.vision.augment import AugmentOptions
from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.layouts import CsvLayout, RegexLayout
from cassava_pipeline.vision.learner import RuntimeConfig, StageConfig
from cassava_pipeline.vision.presize import PresizeOptions
from cassava_pipeline.vision.schedule import LrFindOptions, OneCycle
from cassava_pipeline.vision.split import SplitOptions
from cassava_pipeline.vision.tta import TtaOptions
from tests.images import REPO


def _params(env: str = "local") -> dict:
    loader = ProjectConfigLoader(str(REPO / "conf"), env=env, **LOADER_ARGS)
    return copy.deepcopy(loader["parameters"])


@pytest.mark.parametrize("env", ["local", "kaggle"])
def test_every_environments_parameters_pass(env):
    checked = check_parameters(_params(env))
    assert checked.frozen.train.lr == "auto" and checked.data.raw is None


def test_the_checked_blocks_are_the_objects_the_nodes_hand_to_vision():
    """One description per parameter: the YAML's blocks validate into ``vision``'s own
    dataclasses (no schema beside them), with the stage's size given to its augmentation."""
    raw = _params()
    checked = check_parameters(raw)
    stage = checked.unfrozen.train
    assert isinstance(stage, StageConfig) and isinstance(stage.augment, AugmentOptions)
    assert isinstance(stage.one_cycle, OneCycle) and isinstance(stage.loader, LoaderOptions)
    assert stage.lr == [1e-5, 1e-3] and stage.size == 160 and stage.augmentation.size == 160
    assert stage.one_cycle.moms == (0.95, 0.85, 0.95)
    assert isinstance(checked.runtime, RuntimeConfig) and isinstance(checked.tta, TtaOptions)
    assert isinstance(checked.small.presize, PresizeOptions)
    assert isinstance(checked.lr_find, LrFindOptions) and checked.lr_find.always is False
    assert isinstance(checked.split, SplitOptions)
    assert isinstance(checked.ingest.chosen_layout, CsvLayout)
    assert checked.ingest.report_path == "data/08_reporting/data_report.json"
    assert schema.parse(StageConfig, raw["unfrozen"]["train"]) == stage  # what the node gets


def test_a_dataclass_built_in_python_checks_its_choices_and_links():
    with pytest.raises(ValueError, match=r"augment\.pad_mode is 'mirror': Input should be"):
        AugmentOptions(pad_mode="mirror")
    with pytest.raises(ValueError, match=r"runtime\.precision is '16-mixed': .*needs CUDA"):
        RuntimeConfig(accelerator="cpu", precision="16-mixed")
    with pytest.raises(ValueError, match="the output side is the stage's size"):
        StageConfig("frozen", 1, 1e-3, augment=AugmentOptions(size=64))
    with pytest.raises(ValueError, match=r"lr is 'fast': must be auto"):
        StageConfig("frozen", 1, "fast")
    assert StageConfig("frozen", 1, (1e-5, 1e-3)).lr == (1e-5, 1e-3)
    with pytest.raises(ValueError, match="needs a group"):
        RegexLayout(pattern=r"\d+.jpg")
    with pytest.raises(schema.ParameterError, match=r"tta\.n|n = 0: Input should be greater"):
        schema.parse(TtaOptions, {"n": 0})


BAD = [  # (key, value, the line the error must hold)
    (
        "frozen.train.loader.batch_size",
        -4,
        "frozen.train.loader.batch_size = -4: Input should be greater than or equal to 1",
    ),
    (
        "mixup.train.epochs",
        -1,
        "mixup.train.epochs = -1: Input should be greater than or equal to 0",
    ),
    (
        "unfrozen.train.lr",
        [1e-3, 1e-5],
        "unfrozen.train.lr = [0.001, 1e-05]: [low, high] needs low <= high",
    ),
    ("unfrozen.train.lr", [1e-5, 1e-4, 1e-3], "must be auto, a rate > 0, [high] or [low, high]"),
    ("unfrozen.train.lr", "fast", "unfrozen.train.lr = 'fast': must be auto, a rate > 0"),
    ("frozen.train.epoch", 3, "frozen.train.epoch: unknown key; did you mean epochs?"),
    ("frozn", {}, "frozn: unknown key; did you mean frozen, unfrozen?"),
    ("model.arch", "resnet5", "'resnet5' is neither a torchvision resnet"),
    ("model.arch", "convnext_tiy", "did you mean convnext_tiny"),
    ("model.weights", "packaged", None),  # with resnet50 (set below): only for lite0
    (
        "ingest.layout",
        "folders",
        "ingest.layout = 'folders': Input should be 'csv', 'folder' or 'regex'",
    ),
    ("ingest.regex.pattern", "[a-z]+.jpg", "needs a group, (...), that captures the class name"),
    ("tta.beta", 2, "tta.beta = 2: Input should be less than or equal to 1"),
    ("runtime.precision", "16-mixed", "precision 16-mixed needs CUDA"),
    ("runtime.malloc", "jemalloc", "runtime.malloc = 'jemalloc': Input should be 'tuned' or"),
    ("large.presize.encoding", "png", "Input should be 'raw' or 'jpeg'"),
    ("frozen.train.augment.max_zoom", 0.5, "max_zoom (0.5) is below min_zoom (1.0)"),
    ("frozen.train.optimizer_state", "keep", "Input should be 'fastai' or 'reset'"),
    ("data.raw", "/no/such/folder", "data.raw = '/no/such/folder': is not a folder"),
]


def _set(params: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = params
    for p in parents:
        node = node[p]
    node[last] = value


@pytest.mark.parametrize(("key", "value", "line"), BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_a_bad_value_is_named_with_what_is_allowed(key, value, line):
    params = _params()
    if key == "model.weights":
        params["model"]["arch"] = "resnet50"
        line = "weights: packaged exist only for tf_efficientnet_lite0, not resnet50"
    if key == "runtime.precision":
        params["runtime"]["accelerator"] = "cpu"
    _set(params, key, value)
    with pytest.raises(ParameterError) as e:
        check_parameters(params)
    assert line in str(e.value), str(e.value)
    assert "Fix them and run again" in str(e.value)


def test_every_problem_is_reported_at_once_and_good_values_pass():
    params = _params()
    for key, value, _ in BAD[:3]:
        _set(params, key, value)
    with pytest.raises(ParameterError) as e:
        check_parameters(params)
    assert str(e.value).count("\n  ") == 3
    good = _params()
    _set(good, "unfrozen.train.lr", [1e-3])  # fastai's slice(1e-3)
    _set(good, "mixup.train.epochs", 0)  # the stage switched off
    _set(good, "model.arch", "convnext_tiny")
    _set(good, "model.weights", "none")
    _set(good, "run_name", "mine")
    checked = check_parameters(good)
    assert checked.unfrozen.train.lr == [1e-3] and checked.run_name == "mine"


def test_a_run_with_bad_parameters_stops_before_anything_runs(tmp_path):
    """The check is the first hook of the session: no node, no MLflow run, no lock."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(REPO)
    bad = {"frozen": {"train": {"loader": {"batch_size": -4}, "epoch": 2}}}
    with KedroSession.create(project_path=REPO, runtime_params=bad) as session:
        t = time.perf_counter()
        with pytest.raises(ParameterError) as e:
            session.run(pipeline_names=["cassava"])
        elapsed = time.perf_counter() - t
    assert "frozen.train.loader.batch_size = -4" in str(e.value)
    assert "frozen.train.epoch: unknown key; did you mean epochs?" in str(e.value)
    assert elapsed < 5  # the check itself takes milliseconds; the rest is loading the config
