"""notebooks/cassava.ipynb runs top to bottom on the sample, through Kedro's Jupyter integration.

The test copies the project's configuration into a temporary project, shrinks the sample and the
training in its ``conf/local`` (as a user would), runs ``sample_data`` and ``cassava`` with the
Kedro CLI, then executes the notebook there with a real kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.images import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

SHRINK = {
    "sample_data": {"n_images": 40, "width": 200, "height": 150, "n_test_images": 2},
    "small": {"presize": {"size": 36, "workers": 1}},
    "large": {"presize": {"size": 40, "workers": 1}},
    "runtime": {"accelerator": "cpu", "progress": False},
    "lr_find": {"num_it": 12},
    "tta": {"n": 2},
    **{
        stage: {"train": {"epochs": 1, "size": 32, "loader": {"batch_size": 4}}}
        for stage in ("frozen", "unfrozen", "mixup")
    },
}


def _project(tmp: Path) -> Path:
    root = tmp / "project"
    root.mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    (root / "src").mkdir()  # the package itself is installed (editable) in the environment
    (root / "conf" / "local").mkdir()
    (root / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(SHRINK))
    return root


def _kedro(root: Path, *args: str) -> None:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "kedro", *args],
        check=False,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_notebook_runs_on_the_sample(tmp_path: Path):
    root = _project(tmp_path)
    _kedro(root, "run", "--pipelines=sample_data")
    _kedro(root, "run", "--pipeline=cassava")

    nb = nbformat.read(root / "notebooks" / "cassava.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(root / "notebooks")}},
    )
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 5  # show_batch, lr_find, curves, confusion matrix, top losses
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "Cassava Mosaic Disease (CMD)" in html  # the data report's class table
    assert "with_tta" in html  # the metrics table
    text = "".join(o.get("text", "") for o in outputs)
    assert "Kedro environment: local" in text
    assert "usable images of 40 listed" in text
