"""Hooks around the run itself (cassava_pipeline.hooks.run)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from cassava_pipeline.hooks import NodeTimesHooks, ParametersHooks
from cassava_pipeline.params import ParameterError


def test_node_times_cover_each_node_from_its_first_load_to_its_last_save():
    hooks = NodeTimesHooks()
    hooks.before_pipeline_run({}, None, None)
    a, b = SimpleNamespace(name="a"), SimpleNamespace(name="b")
    hooks.before_dataset_loaded("x", a)
    time.sleep(0.02)
    hooks.after_dataset_saved("y", None, a)
    hooks.before_node_run(b, None, {}, False)  # no inputs
    hooks.after_node_run(b, None, {}, {}, False)  # no outputs
    hooks.before_dataset_loaded("z", SimpleNamespace(name="c"))  # never ended: left out
    times = hooks.times()
    assert list(times) == ["a", "b", "run"]
    assert times["a"] >= 0.02 and times["run"] >= times["a"] + times["b"]


def test_bad_parameters_stop_before_anything_runs():
    with pytest.raises(ParameterError, match="runtime"):
        ParametersHooks().after_context_created(SimpleNamespace(params={"runtime": 1}))


# Kedro's note on dotted dataset names: the dots are its namespacing (pipeline_registry.py)
@pytest.mark.filterwarnings("ignore:One or more dataset names contain")
def test_a_fold_count_the_cv_pipeline_was_not_built_with_is_refused():
    from cassava_pipeline.pipelines.cv import create_pipeline
    from tests.test_params import _params

    params = _params()
    params["cv"]["folds"] = 3
    hooks = ParametersHooks()
    hooks.after_context_created(SimpleNamespace(params=params))
    five = create_pipeline(folds=5)
    with pytest.raises(ParameterError, match=r"cv\.folds is 3.*fold_0, fold_1, fold_2, fold_3"):
        hooks.before_pipeline_run({}, five, None)
    with pytest.raises(ParameterError, match="KEDRO_ENV"):  # one fold past the three
        hooks.before_pipeline_run({}, five.only_nodes_with_namespaces(["fold_4"]), None)
    hooks.before_pipeline_run({}, five.only_nodes_with_namespaces(["fold_2"]), None)  # a fold
    hooks.before_pipeline_run({}, create_pipeline(folds=3), None)  # built as asked
    hooks.before_pipeline_run({}, SimpleNamespace(nodes=[]), None)  # not cassava_cv


@pytest.mark.filterwarnings("ignore:One or more dataset names contain")
def test_the_fold_count_is_the_registered_pipelines_not_the_runs_nodes(monkeypatch):
    """`--to-nodes=fold_0.evaluate` runs make_folds and one fold of a five-fold pipeline: a
    run of it, not a pipeline built for one fold; a registered pipeline of another count is
    refused whatever the run's nodes."""
    from cassava_pipeline.hooks import run
    from cassava_pipeline.pipelines.cv import create_pipeline
    from tests.test_params import _params

    five = create_pipeline(folds=5)
    monkeypatch.setattr(run, "registered", lambda names: [five] if "cassava_cv" in names else [])
    upstream = five.to_nodes("fold_0.evaluate")
    assert "make_folds" in {n.name for n in upstream.nodes} and run.folds_of(upstream) == [0]
    params = _params()
    params["cv"]["folds"] = 5
    hooks = ParametersHooks()
    hooks.after_context_created(SimpleNamespace(params=params))
    hooks.before_pipeline_run({"pipeline_names": ["cassava_cv"]}, upstream, None)
    params["cv"]["folds"] = 3
    hooks.after_context_created(SimpleNamespace(params=params))
    alone = five.only_nodes_with_namespaces(["fold_1"])
    with pytest.raises(ParameterError, match=r"cv\.folds is 3.*fold_0, fold_1, fold_2, fold_3"):
        hooks.before_pipeline_run({"pipeline_names": ["cassava_cv"]}, alone, None)
