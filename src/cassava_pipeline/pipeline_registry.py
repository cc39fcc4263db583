"""Project pipelines."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Each folder of ``pipelines/`` is a pipeline of its own name (``sample_data``, ``ingest``,
    ``presize``). ``data`` is the data half of the recipe (a DVC stage) and ``cassava`` the
    whole recipe; ``__default__`` is ``cassava``.
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["data"] = pipelines["ingest"] + pipelines["presize"]
    pipelines["cassava"] = pipelines["data"]
    pipelines["__default__"] = pipelines["cassava"]
    return pipelines
