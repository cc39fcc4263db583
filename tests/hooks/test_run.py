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
