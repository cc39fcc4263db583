"""The demo through the Kedro CLI, as a user runs it: MLflow records it, the notebook reads it.

The fixture copies the project's configuration into a temporary project, shrinks the sample and
the training in its ``conf/local`` (as a user would) and runs ``sample_data`` and ``cassava``
with the Kedro CLI once. The tests then check the MLflow run kedro-mlflow and our hooks
recorded, execute the notebook with a real kernel, and interrupt or crash further runs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests import servers
from tests.images import REPO
from tests.pipelines.conftest import PLOTS

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


ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg"}


def _kedro(
    root: Path, *args: str, ok: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**ENV, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "kedro", *args],
        check=False,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A temporary project after `kedro run --pipelines=sample_data` and `--pipelines=cassava`."""
    root = _project(tmp_path_factory.mktemp("demo"))
    _kedro(root, "run", "--pipelines=sample_data")
    proc = _kedro(root, "run", "--pipelines=cassava")
    (root / "cassava_run.log").write_text(proc.stdout + proc.stderr)  # what the user saw
    return root


# What the demo run may print at warning level, each understood; anything else fails the test.
ALLOWED_WARNINGS = (
    # split's own, naming the classes this 40-image sample leaves weak: a user adds images
    "split: class(es)",
)
WARNING_LINE = re.compile(r"WARNING|Warning\b|Hint:|deprecated", re.IGNORECASE)


@pytest.mark.slow
def test_a_clean_run_prints_only_what_a_user_can_act_on(demo: Path):
    """Kedro's --pipeline deprecation, the dotted dataset names, MLflow's type-hint, dataset-source
    and integer-column hints, scikit-learn's absent-class warning: none of them, nor any other."""
    log = (demo / "cassava_run.log").read_text()
    flagged = [line for line in log.splitlines() if WARNING_LINE.search(line)]
    unexpected = [line for line in flagged if not any(a in line for a in ALLOWED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)
    assert "Traceback" not in log and len(flagged) == 2  # the two of split's, and no more


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _runs(root: Path) -> list:
    client = _client(root)
    exp = client.get_experiment_by_name("cassava_pipeline")
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_mlflow_records_the_run(demo: Path):
    client = _client(demo)
    (run,) = _runs(demo)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["frozen.train.epochs"] == "1" and params["model.arch"] == "tf_efficientnet_lite0"
    assert params["tta.n"] == "2"  # every parameter, under its flattened name
    # per-epoch metrics at the global epoch across the three stages
    for key in ("train_loss", "valid_loss", "accuracy", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2]
    metrics = run.data.metrics
    assert 0 <= metrics["final_metrics.accuracy"] <= 1
    assert 0 <= metrics["final_metrics.tta_accuracy"] <= 1
    # each node's whole time (inputs loaded to outputs saved), and the run's
    times = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("seconds/")}
    stages = [f"{s}.train_stage" for s in ("frozen", "unfrozen", "mixup")]
    assert {*stages, "lr_find", "evaluate", "export_model", "ingest_images", "run"} <= set(times)
    assert all(v > 0 for v in times.values())
    assert sum(v for k, v in times.items() if k != "run") <= times["run"] + 0.01
    for stage in ("frozen", "unfrozen", "mixup"):  # a node holds its epochs and more
        history = pd.read_csv(demo / "data" / "08_reporting" / f"history_{stage}.csv")
        assert times[f"{stage}.train_stage"] > history["seconds"].sum()
    tags = run.data.tags
    assert {
        "git_commit",
        "git_dirty",
        "lock_hash",
        "torch_version",
        "cuda_version",
        "device",
    } <= set(tags)
    assert len(tags["data_hash"]) == 64 and tags["kedro_pipeline"] == "cassava"
    # named from what tells runs apart; the experiment opens on the runs table (MLflow 3)
    assert run.info.run_name == "local tf_efficientnet_lite0 32px 1+1+1ep seed42"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["final_stage"] == "mixup" and tags["skipped_stages"] == "none"
    # the training and validation sides as dataset inputs, with their digests
    inputs = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
        for i in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "validation"}
    assert (
        inputs["training"].name == "cassava_sample-train" and len(inputs["training"].digest) == 16
    )
    assert inputs["training"].digest != inputs["validation"].digest
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {f"{n}.png" for n in PLOTS}
    reports = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "reporting")}
    assert {"metrics.json", "data_report.json", "interpretation.json", "lr_find.json"} <= reports
    models = client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]


@pytest.mark.slow
def test_a_crash_marks_the_run_failed(demo: Path):
    # a valid name of a device this machine does not have: the frozen stage fails
    proc = _kedro(demo, "run", "--pipelines=train", "--params=runtime.accelerator=tpu", ok=False)
    assert proc.returncode != 0
    assert max(_runs(demo), key=lambda r: r.info.start_time).info.status == "FAILED"
    out = proc.stdout + proc.stderr
    # the run is opened once, not once more per node: one system-metrics monitor, and at most
    # one closing line (kedro-mlflow's, at INFO)
    assert out.count("was closed because of an error in the pipeline") <= 1, out[-3000:]
    assert out.count("Started monitoring system metrics") == 1, out[-3000:]


@pytest.mark.slow
def test_bad_parameters_stop_at_once_with_the_cause_last(demo: Path):
    runs = len(_runs(demo))
    proc = _kedro(
        demo,
        "run",
        "--pipelines=cassava",
        "--params=frozen.train.loader.batch_size=-4,mixup.train.epoch=2",
        ok=False,
    )
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "Running node" not in out and "Traceback" not in out
    assert "kedro/runner" not in out and "kedro/framework/session" not in out  # no frames
    last = [line for line in proc.stderr.splitlines() if line.strip()][-5:]
    assert last[0] == "The run stopped: ParameterError", last
    assert (
        "  frozen.train.loader.batch_size = -4: Input should be greater than or equal to 1" in last
    )
    assert "  mixup.train.epoch: unknown key; did you mean epochs?" in last
    assert last[-1].startswith("Fix them and run again")
    assert len(_runs(demo)) == runs  # no MLflow run was started


@pytest.mark.slow
def test_sigterm_marks_the_run_killed(demo: Path):
    before = {r.info.run_id for r in _runs(demo)}
    proc = _start_long_training(demo, "sigterm.log")
    try:
        _wait_for_mixup_epochs(demo, before, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    runs = _runs(demo)
    log = (demo / "sigterm.log").read_text()[-3000:]
    (new,) = [r for r in runs if r.info.run_id not in before]
    assert new.info.status == "KILLED", log
    assert not [r for r in runs if r.info.status == "RUNNING"]


def _start_long_training(demo: Path, log: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kedro",
            "run",
            "--pipelines=train",
            "--params=mixup.train.epochs=200",
        ],
        cwd=demo,
        env=ENV,
        stdout=open(demo / log, "w"),
        stderr=subprocess.STDOUT,
    )


def _wait_for_mixup_epochs(demo: Path, before: set[str], proc: subprocess.Popen) -> None:
    """Until the new run has logged mixup epochs (step >= 3)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        with sqlite3.connect(demo / "mlflow.db") as con:
            row = con.execute(
                "SELECT COUNT(*) FROM metrics WHERE key='accuracy' AND step >= 3 AND "
                "run_uuid=(SELECT run_uuid FROM runs ORDER BY start_time DESC LIMIT 1)"
            ).fetchone()
        if row[0] and len(_runs(demo)) > len(before):
            return
        time.sleep(1)
    raise AssertionError("the training never reached the mixup stage")


@pytest.mark.slow
def test_a_second_run_is_refused_at_once_while_one_holds_the_project(demo: Path):
    from cassava_pipeline.runlock import RunLock

    before = {r.info.run_id for r in _runs(demo)}
    with RunLock(demo, "local"):  # as a live `kedro run` in this project holds it
        t0 = time.time()
        proc = _kedro(demo, "run", "--pipelines=evaluate", ok=False)
        elapsed = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ProjectBusyError" in out, out[-3000:]
    assert f"pid {os.getpid()}" in " ".join(out.split()), out[-3000:]
    assert elapsed < 60  # refused before any work (Kedro's start-up is the rest)
    assert {r.info.run_id for r in _runs(demo)} == before  # no MLflow run was even opened
    _kedro(demo, "run", "--pipelines=evaluate")  # and free again afterwards


@pytest.mark.slow
def test_after_kill_9_the_next_run_takes_over_and_marks_the_dead_run_killed(demo: Path):
    before = {r.info.run_id for r in _runs(demo)}
    proc = _start_long_training(demo, "kill9.log")
    try:
        _wait_for_mixup_epochs(demo, before, proc)
        proc.kill()  # SIGKILL: no handler runs, the MLflow run stays RUNNING
        proc.wait(timeout=60)
    finally:
        proc.kill()
    (dead,) = [r for r in _runs(demo) if r.info.run_id not in before]
    assert dead.info.status == "RUNNING"
    assert dead.data.tags["pid"] == str(proc.pid)
    after = _kedro(demo, "run", "--pipelines=evaluate")
    text = " ".join((after.stdout + after.stderr).split())
    assert "took over the run lock" in text and f"pid {proc.pid}" in text, text[-3000:]
    assert "marked 1 MLflow run(s) KILLED" in text and dead.info.run_id in text, text[-3000:]
    statuses = {r.info.run_id: r.info.status for r in _runs(demo)}
    assert statuses[dead.info.run_id] == "KILLED"
    assert "RUNNING" not in statuses.values()
    # whatever the killed run was writing, its temporaries are gone after the next start
    assert not [p for p in (demo / "data").rglob(f"*.tmp-{proc.pid}")]


@pytest.mark.slow
def test_notebook_runs_on_the_sample(demo: Path):
    root = demo

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


# ---- remote tracking: PostgreSQL + `mlflow server`, then `mlflow models serve` ----------------

USER = ("cassava", "cassava-password-1")


def _remote_conf(uri: str) -> dict[str, str]:
    """The two files of conf/local the README's 'Remote tracking' shows, for this server."""
    return {
        "mlflow.yml": f"server:\n  mlflow_tracking_uri: {uri}\n  credentials: mlflow_server\n",
        "credentials.yml": (
            "mlflow_server:  # exported as environment variables by kedro-mlflow\n"
            f"  MLFLOW_TRACKING_USERNAME: {USER[0]}\n"
            f"  MLFLOW_TRACKING_PASSWORD: {USER[1]}\n"
        ),
    }


def _require_postgres() -> None:
    """Skip without PostgreSQL, except in CI, where .ci/run installs it and its absence fails."""
    if servers.postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing: .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")


@pytest.fixture(scope="module")
def remote(demo: Path, tmp_path_factory):
    """The demo project run once more, mirrored to a tracking server backed by PostgreSQL.

    The server runs without basic-auth (a second test checks it); the credentials file is
    written all the same, as a user of an authenticated server writes it.
    """
    _require_postgres()
    tmp = tmp_path_factory.mktemp("remote")
    root = tmp / "project"
    shutil.copytree(demo, root, ignore=shutil.ignore_patterns("mlflow.db", "mlruns", "*.log"))
    with (
        servers.postgres(("mlflow", "mlflow_auth")) as db,
        servers.mlflow_server(db, tmp / "server") as server,
    ):
        for name, text in _remote_conf(server.uri).items():
            (root / "conf" / "local" / name).write_text(text)
        _kedro(root, "run", "--pipelines=cassava")
        yield root, server, db


def _remote_client(server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
    return MlflowClient(server.uri)


@pytest.mark.slow
def test_remote_tracking_server_on_postgres(remote, monkeypatch):
    root, server, db = remote
    client = _remote_client(server, monkeypatch)
    exp = client.get_experiment_by_name("cassava_pipeline")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    # recorded in the local store and mirrored whole: nothing waits for a sync
    from mlflow.tracking import MlflowClient

    from cassava_pipeline.fallback import SYNCED_TO, pending

    local_uri = f"sqlite:///{root / 'mlflow.db'}"
    (local,) = MlflowClient(local_uri).search_runs(
        [MlflowClient(local_uri).get_experiment_by_name("cassava_pipeline").experiment_id]
    )
    assert local.data.tags[SYNCED_TO] == f"{server.uri} {run.info.run_id}"
    assert pending(local_uri) == []
    assert run.data.params["frozen.train.epochs"] == "1"
    for key in ("train_loss", "valid_loss", "accuracy", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2]
    assert 0 <= run.data.metrics["final_metrics.tta_accuracy"] <= 1
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {f"{n}.png" for n in PLOTS}
    # the artifacts went through the server, which wrote them to its own folder
    local = Path(client.download_artifacts(run.info.run_id, "reporting/metrics.json", str(root)))
    assert json.loads(local.read_text()) == json.loads(
        (root / "data" / "08_reporting" / "metrics.json").read_text()
    )
    # and the run really is in PostgreSQL
    import sqlalchemy

    engine = sqlalchemy.create_engine(db.uri("mlflow"))
    with engine.connect() as con:
        sql = "SELECT status FROM runs WHERE run_uuid = :id"
        assert con.execute(sqlalchemy.text(sql), {"id": run.info.run_id}).scalar() == "FINISHED"
    engine.dispose()


@pytest.mark.slow
def test_models_serve_answers_with_the_models_labels(remote, monkeypatch):
    root, server, _ = remote
    from cassava_pipeline.vision.predict import Classifier

    client = _remote_client(server, monkeypatch)
    exp = client.get_experiment_by_name("cassava_pipeline")
    (run,) = client.search_runs([exp.experiment_id])
    images = sorted((root / "data" / "01_raw" / "cassava_sample" / "train_images").glob("*.jpg"))
    images = images[:6]
    expected = Classifier.load(root / "data" / "06_models" / "model.safetensors").predict(images)

    env = {**ENV, "MLFLOW_TRACKING_URI": server.uri}
    env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = USER
    with servers.model_server(f"runs:/{run.info.run_id}/model", env, root) as url:
        by_path = servers.post_json(
            f"{url}/invocations",
            {"dataframe_split": {"columns": ["image"], "data": [[str(p)] for p in images]}},
        )
        encoded = "base64:" + base64.b64encode(images[0].read_bytes()).decode()
        by_bytes = servers.post_json(
            f"{url}/invocations",
            {"dataframe_split": {"columns": ["image"], "data": [[encoded], ["nope.jpg"]]}},
        )
    rows = by_path["predictions"]
    assert [r["label"] for r in rows] == expected.label_ids
    assert [r["class_name"] for r in rows] == expected.labels
    probs = expected.probabilities.max(1)
    assert [r["probability"] for r in rows] == pytest.approx(probs.tolist(), abs=1e-6)
    first, missing = by_bytes["predictions"]
    assert first["label"] == expected.label_ids[0] and first["error"] == ""
    assert missing["label"] == "" and "nope.jpg" in missing["error"]


@pytest.mark.slow
def test_basic_auth_server_takes_the_users_credentials(tmp_path, monkeypatch):
    """The README's authenticated server: anonymous writes are refused, the user's go through."""
    _require_postgres()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with (
        servers.postgres(("mlflow", "mlflow_auth")) as db,
        servers.mlflow_server(db, tmp_path / "server", auth=True) as server,
    ):
        server.add_user(*USER)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(MlflowException, match=r"401|[Uu]nauthenticated|credentials"):
            MlflowClient(server.uri).create_experiment("anonymous")
        client = _remote_client(server, monkeypatch)
        exp = client.create_experiment("cassava_pipeline")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "accuracy", 0.5, step=2)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [2]


# ---- a tracking server that dies mid-run: the run completes locally, then goes back ----------


def _watch(proc: subprocess.Popen, log: Path, until, timeout: float = 600) -> float | None:
    """Poll until ``until()`` holds (returns the time) or the process ends (returns None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return time.monotonic()
        if proc.poll() is not None:
            return None
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_server_dying_mid_run_falls_back_and_sync_sends_the_run_back(demo: Path, tmp_path):
    """A real `mlflow server` on loopback, stopped once the frozen stage is saved: the run
    completes with every output (recorded whole in the local store), exits 0 soon after the
    pipeline's end with one warning, and `python -m cassava_pipeline.fallback sync` gives the
    server run everything it missed."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cassava_pipeline.fallback import FALLBACK_FOR, SYNCED_TO

    root = tmp_path / "project"  # the demo's raw sample, none of its outputs or runs
    shutil.copytree(demo, root, ignore=shutil.ignore_patterns("mlflow.db", "mlruns", "*.log"))
    for layer in (root / "data").iterdir():
        if layer.name != "01_raw":
            shutil.rmtree(layer)
    workdir, port = tmp_path / "server", servers.free_port()
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    (root / "conf" / "local" / "mlflow.yml").write_text(
        f"server:\n  mlflow_tracking_uri: http://127.0.0.1:{port}\n"
    )
    log = tmp_path / "run.log"
    frozen = root / "data" / "06_models" / "frozen.pt"
    with servers.mlflow_server(backend, workdir, port=port) as server, open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kedro", "run", "--pipelines=cassava"],
            cwd=root, env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert _watch(proc, log, frozen.exists) is not None, log.read_text()[-3000:]
        server_run_ids = [
            r.info.run_id
            for r in MlflowClient(server.uri).search_runs(
                [MlflowClient(server.uri).get_experiment_by_name("cassava_pipeline").experiment_id]
            )
        ]
    # the server is stopped here, mid-run (the unfrozen stage is training)
    ended = _watch(proc, log, lambda: "completed successfully" in log.read_text())
    assert ended is not None, log.read_text()[-3000:]
    proc.wait(timeout=120)
    exited = time.monotonic()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert exited - ended < 60, f"{exited - ended:.0f} s from the pipeline's end to the exit"
    assert text.count("stopped answering") == 1, text[-3000:]
    assert "Retrying" not in text and "Failed to get mlflow run" not in text  # no retry storm
    assert "cassava_pipeline.fallback sync" in text
    for output in ("06_models/model.safetensors", "08_reporting/metrics.json"):
        assert (root / "data" / output).is_file()

    (server_run,) = server_run_ids
    local = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (fallback,) = local.search_runs(
        [local.get_experiment_by_name("cassava_pipeline").experiment_id]
    )
    assert fallback.info.status == "FINISHED"
    assert fallback.data.tags[FALLBACK_FOR] == server_run
    assert "final_metrics.tta_accuracy" in fallback.data.metrics
    assert fallback.data.params["frozen.train.epochs"] == "1"

    with servers.mlflow_server(backend, workdir, port=port) as server:
        client = MlflowClient(server.uri)
        assert client.get_run(server_run).info.status == "RUNNING"  # what the server last heard
        sync = [sys.executable, "-m", "cassava_pipeline.fallback", "sync"]
        done = subprocess.run(sync, check=False, cwd=root, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"-> {server.uri} run {server_run}" in done.stdout
        assert "1 model(s)" in done.stdout, done.stdout + done.stderr
        run = client.get_run(server_run)
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "valid_loss", "accuracy", "lr"):  # frozen live, then local
            assert [m.step for m in client.get_metric_history(server_run, key)] == [0, 1, 2]
        assert run.data.metrics["final_metrics.tta_accuracy"] == pytest.approx(
            fallback.data.metrics["final_metrics.tta_accuracy"]
        )
        assert run.data.params["mixup.train.epochs"] == "1"
        plots = {Path(a.path).name for a in client.list_artifacts(server_run, "plots")}
        assert plots == {f"{n}.png" for n in PLOTS}
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(server.uri)  # MLflow resolves a run's models in the global store
        try:  # runs:/<server run>/model resolves to the model made again there
            model = Path(
                mlflow.artifacts.download_artifacts(
                    f"runs:/{server_run}/model", dst_path=str(tmp_path / "dl")
                )
            )
        finally:
            mlflow.set_tracking_uri(previous)
        assert (model / "MLmodel").is_file()
        assert (model / "artifacts" / "model.safetensors").read_bytes() == (
            root / "data" / "06_models" / "model.safetensors"
        ).read_bytes()
        again = subprocess.run(sync, check=False, cwd=root, env=ENV, capture_output=True, text=True)
        assert again.returncode == 0 and "nothing to send" in again.stdout, again.stdout
        assert len(client.get_metric_history(server_run, "accuracy")) == 3  # nothing twice
    assert SYNCED_TO in local.get_run(fallback.info.run_id).data.tags
    # A server down from the start: the run is recorded locally, and sync gives it a server run.
    rerun = _kedro(root, "run", "--pipelines=evaluate")
    assert "does not answer" in rerun.stdout + rerun.stderr
    with servers.mlflow_server(backend, workdir, port=port) as server:
        done = subprocess.run(sync, check=False, cwd=root, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.count("sent local run") == 1, done.stdout
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("cassava_pipeline").experiment_id
        (new,) = [r for r in client.search_runs([exp]) if r.info.run_id != server_run]
        assert new.info.status == "FINISHED" and new.data.tags["kedro_pipeline"] == "evaluate"
        assert "final_metrics.tta_accuracy" in new.data.metrics


@pytest.mark.slow
def test_two_runs_compare_side_by_side_in_mlflow(demo: Path):
    """fastai's fine_tune (no mixup) next to the full recipe: another name, its parameters, the
    same data digests, and the stage its model comes from."""
    _kedro(demo, "run", "--pipelines=cassava", "--params=mixup.train.epochs=0")
    client = _client(demo)
    finished = [r for r in _runs(demo) if r.data.tags.get("kedro_pipeline") == "cassava"]
    finished = [r for r in finished if r.info.status == "FINISHED"]
    first = min(finished, key=lambda r: r.info.start_time)
    second = max(finished, key=lambda r: r.info.start_time)
    assert first.info.run_name == "local tf_efficientnet_lite0 32px 1+1+1ep seed42"
    assert second.info.run_name == "local tf_efficientnet_lite0 32px 1+1+0ep seed42"
    assert (first.data.params["mixup.train.epochs"], second.data.params["mixup.train.epochs"]) == (
        "1",
        "0",
    )
    assert second.data.tags["final_stage"] == "unfrozen"
    assert second.data.tags["skipped_stages"] == "mixup"
    digests = [sorted(i.dataset.digest for i in r.inputs.dataset_inputs) for r in (first, second)]
    assert digests[0] == digests[1] and len(digests[0]) == 2  # the same data, recorded as such
    # the runs table's view: both rows, named, with their metrics
    table = client.search_runs(
        [first.info.experiment_id],
        filter_string="tags.kedro_pipeline = 'cassava' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    assert [r.info.run_name for r in table[-2:]] == [first.info.run_name, second.info.run_name]
    assert all("final_metrics.tta_accuracy" in r.data.metrics for r in table[-2:])


def test_predict_a_folder_of_new_photos_in_one_step(demo: Path, tmp_path: Path):
    """--params=predict.images=<folder>: no catalog to write; odd sizes, grayscale, a nested
    folder and a non-image file, the last skipped and reported."""
    from tests.images import write_jpeg

    photos = tmp_path / "new photos"
    write_jpeg(photos / "a.jpg", 499, 500, seed=1)  # near-square odd: DCT-scaled to 250x250
    write_jpeg(photos / "day2" / "b.jpeg", 90, 160, seed=2)
    Image.fromarray(np.full((70, 50), 120, dtype=np.uint8)).save(photos / "gray.png")
    (photos / "notes.txt").write_text("not a photo")
    # Kedro's older spelling, --pipeline, still runs (Kedro says it is deprecated)
    proc = _kedro(demo, "run", "--pipeline=cassava_predict", f"--params=predict.images={photos}")
    assert "predicted 3 of 4 images with TTA; 1 skipped" in proc.stdout + proc.stderr
    assert "Option '--pipeline' is deprecated" in " ".join((proc.stdout + proc.stderr).split())
    sub = pd.read_csv(demo / "data" / "07_model_output" / "submission.csv")
    assert sorted(sub["image_id"]) == ["a.jpg", "day2/b.jpeg", "gray.png"]
    report = json.loads((demo / "data" / "08_reporting" / "predict_report.json").read_text())
    assert report["folder"] == str(photos) and report["skipped"][0]["path"] == "notes.txt"


def test_predict_says_where_a_model_is_missing(demo: Path, tmp_path: Path):
    """A data set nothing was trained on: one message naming the file and what to run."""
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    proc = _kedro(
        demo,
        "run",
        "--pipelines=cassava_predict",
        f"--params=data.raw={untrained},predict.images={untrained}",
        ok=False,
    )
    assert proc.returncode == 1
    tail = proc.stderr.strip().splitlines()[-2:]
    assert "The run stopped: ExportError" in tail[0], proc.stderr[-2000:]
    assert "No trained model at " in tail[1] and "/data/06_models/untrained-" in tail[1]
    assert "train one first with the same --env and data.raw" in tail[1]
    assert "Traceback" not in proc.stderr


# Loaded at the start of the kedro process (Python imports sitecustomize from sys.path): the
# rename that puts one named output in place fails as a full or a read-only disk makes it fail.
DISK_FAULT = """
import errno, os
_name, _code = os.environ["CASSAVA_TEST_DISK_FAULT"].split(":")
_real = os.replace
def _replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == _name:
        code = getattr(errno, _code)
        raise OSError(code, os.strerror(code), os.fspath(dst))
    return _real(src, dst, *args, **kwargs)
os.replace = _replace
"""


@pytest.mark.slow
def test_a_full_or_read_only_disk_stops_the_run_with_one_message_and_loses_nothing(
    demo: Path, tmp_path: Path
):
    """ENOSPC, then EROFS, on the data report's write: each run exits 1 with the cause and what
    to do as its last lines, no traceback; the report from before is unchanged, no temporary is
    left under data/, MLflow marks the run FAILED. With the disk fixed the next run succeeds."""
    (tmp_path / "sitecustomize.py").write_text(DISK_FAULT)
    report = demo / "data" / "08_reporting" / "data_report.json"
    before = report.read_bytes()
    for code, todo in (("ENOSPC", "Free space on that disk"), ("EROFS", "writable for this user")):
        fault = {"PYTHONPATH": str(tmp_path), "CASSAVA_TEST_DISK_FAULT": f"data_report.json:{code}"}
        proc = _kedro(demo, "run", "--pipelines=cassava", ok=False, env=fault)
        assert proc.returncode == 1, proc.stderr[-3000:]
        tail = proc.stderr.strip().splitlines()[-2:]
        assert tail[0] == "The run stopped: WriteError", proc.stderr[-3000:]
        assert tail[1].startswith(f"Could not write {report}: ") and todo in tail[1]
        assert "Traceback" not in proc.stderr
        assert report.read_bytes() == before
        assert not [p for p in (demo / "data").rglob(".*") if ".tmp-" in p.name]
        latest = _runs(demo)[0]  # newest first
        assert latest.info.status == "FAILED"
    _kedro(demo, "run", "--pipelines=ingest")  # the disk fixed
    assert json.loads(report.read_text())["n_images"] == json.loads(before)["n_images"]
    assert _runs(demo)[0].info.status == "FINISHED"
