"""The project's ``kedro run`` command: what it adds around Kedro's own."""

from __future__ import annotations

import gc

import pytest

from cassava_pipeline import cli
from cassava_pipeline.vision.layouts import LayoutError


@pytest.fixture
def unfrozen():
    """The test process's objects back in the collector's generations afterwards."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_run_command_freezes_what_lives_for_the_whole_run(monkeypatch, unfrozen):
    seen: dict[str, int] = {}
    made: list[list[int]] = []

    def callback(*args, **kwargs):
        seen["frozen"] = gc.get_freeze_count()
        seen["tracked"] = len(gc.get_objects())
        made.extend([i] for i in range(1000))  # what a run creates after it started
        return "done"

    monkeypatch.setattr(cli.kedro_run, "callback", callback)
    alive = len(gc.get_objects())
    assert alive > 1000
    assert cli._run() == "done"
    # every object alive when the command started was frozen before Kedro's run began ...
    assert seen["frozen"] >= alive
    assert seen["tracked"] < alive / 10
    # ... and what the run made is frozen too once it has ended: exit's collection skips it
    assert gc.get_freeze_count() >= seen["frozen"] + len(made)
    assert not any(obj is made[0] for obj in gc.get_objects())


def test_a_known_error_stops_the_command_in_one_message_and_freezes_too(
    monkeypatch, capsys, unfrozen
):
    made: list[list[int]] = []

    def callback(*args, **kwargs):
        made.extend([i] for i in range(1000))
        raise RuntimeError("in a node") from LayoutError("no train/ folder under data/01_raw")

    monkeypatch.setattr(cli.kedro_run, "callback", callback)
    with pytest.raises(SystemExit) as stop:
        cli._run()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "The run stopped: LayoutError" in err
    assert "no train/ folder under data/01_raw" in err
    assert "Traceback" not in err
    assert not any(obj is made[0] for obj in gc.get_objects())  # frozen on the way out too


def test_any_other_error_keeps_its_traceback(monkeypatch, unfrozen):
    def callback(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli.kedro_run, "callback", callback)
    with pytest.raises(KeyError, match="a bug"):
        cli._run()
