"""`dvc repro` on the embedded sample, in a temporary git repository, as a user runs it.

The fixture copies the project's tracked files (``dvc.yaml`` and ``.dvc/`` included) into a new
git repository, shrinks the sample and the training in an environment of its own (``conf/ci``,
selected with ``dvc.yaml``'s vars as a user selects ``kaggle``) and runs ``dvc repro`` once. The
tests then check what reruns after what changes (in conf/base and in the environment's file),
experiments, and a push to a local remote followed by a pull into an emptied cache.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cassava_pipeline.vision.export import load_model_file
from tests.images import REPO
from tests.test_demo_run import ENV as DEMO_ENV
from tests.test_demo_run import SHRINK

BIN = Path(sys.executable).parent
ENV = {
    **DEMO_ENV,  # no telemetry, a headless matplotlib
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `kedro` in the stages' commands
    "COLUMNS": "300",  # Kedro's rich log: one line per message
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
}
STAGES = ("params", "sample", "data", "train", "evaluate")
CV_STAGES = ("cv_folds", "cv_fold@0", "cv_fold@1", "cv_report")  # two folds in conf/ci
CV_BLOCK = re.compile(r"\n  # ---- cassava_cv.*?(?=\n# dvc plots)", re.S)
ENV_NAME = "ci"  # the test's Kedro environment: conf/ci, outputs under ci/ folders
CHECKPOINTS = ("initial.pt", "frozen.pt", "unfrozen.pt", "mixup.pt", "model.safetensors")


def _run(root: Path, *cmd: str) -> str:
    proc = subprocess.run(
        cmd, cwd=root, env=ENV, capture_output=True, text=True, check=False, timeout=900
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def dvc(root: Path, *args: str) -> str:
    return _run(root, str(BIN / "dvc"), *args)


def git(root: Path, *args: str) -> str:
    return _run(root, "git", *args)


def ran(log: str, stages: tuple[str, ...] = STAGES) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` log says it ran."""
    return [s for s in stages if f"Running stage '{s}'" in log]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> dict:
    """A git repository holding the project after one `dvc repro` and then a second."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path_factory.mktemp("dvc") / "project"
    for name in _tracked_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    git(root, "init", "-q")
    default_dag = dvc(root, "dag", "--md")  # the committed vars (env: local) parse
    env_dir = root / "conf" / ENV_NAME
    env_dir.mkdir(parents=True)
    (env_dir / "parameters.yml").write_text(yaml.safe_dump({**SHRINK, "cv": {"folds": 2}}))
    (root / "conf" / "local").mkdir(parents=True, exist_ok=True)  # Kedro needs it to exist
    dvc_yaml = (root / "dvc.yaml").read_text()
    changes = (
        ("env: local", f"env: {ENV_NAME}"),
        ('sub: ""', f"sub: {ENV_NAME}/"),
        ("folds: [0, 1, 2, 3, 4]", "folds: [0, 1]"),
    )
    for old, new in changes:
        assert old in dvc_yaml
        dvc_yaml = dvc_yaml.replace(old, new, 1)
    # the single-split recipe's stages first; the cross-validation's join in the last test
    cv_stages = CV_BLOCK.search(dvc_yaml).group(0)
    (root / "dvc.yaml").write_text(CV_BLOCK.sub("", dvc_yaml))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    first = dvc(root, "repro")
    second = dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "dvc repro")
    return {
        "root": root,
        "first": first,
        "second": second,
        "default_dag": default_dag,
        "cv_stages": cv_stages,
    }


def out(root: Path, layer: str, name: str) -> Path:
    """An output of the test environment (under its own folder of each data layer)."""
    return root / "data" / layer / ENV_NAME / name


def params_file(root: Path) -> str:
    return f"data/08_reporting/{ENV_NAME}/parameters.yml"


@pytest.mark.slow
def test_repro_runs_every_stage_then_nothing(repo):
    root = repo["root"]
    assert all(f"{s}" in repo["default_dag"] for s in STAGES + CV_STAGES[:1])
    assert ran(repo["first"]) == list(STAGES)
    assert ran(repo["second"]) == []
    assert json.loads(dvc(root, "status", "--json")) == {}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    # params are the merged parameters of the environment: conf/ci overrides conf/base
    train_params = lock["train"]["params"][params_file(root)]
    assert train_params["frozen"]["train"]["epochs"] == 1  # conf/ci (conf/base says 3)
    assert train_params["mixup"]["train"]["mixup"] == 0.2  # conf/base
    assert len(train_params["catalog_digest"]) == 64
    metrics = json.loads(dvc(root, "metrics", "show", "--json"))
    values = metrics[""]["data"][f"data/08_reporting/{ENV_NAME}/metrics.json"]["data"]
    assert 0 <= values["with_tta"]["accuracy"] <= 1
    # what DVC cached is what the pipeline wrote, in the environment's own folders
    outs = {o["path"]: o["md5"] for o in lock["train"]["outs"]}
    mixup = out(root, "06_models", "mixup.pt")
    assert outs[str(mixup.relative_to(root))] == hashlib.md5(mixup.read_bytes()).hexdigest()
    assert not (root / "data" / "06_models" / "mixup.pt").exists()  # not the default env's


def _mlflow(root: Path):
    """The project's MLflow client and every run of every experiment, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client, sorted(client.search_runs(ids), key=lambda r: r.info.start_time)


def _dvc_runs(root: Path) -> list[tuple[object, dict[str, object]]]:
    """Each top-level run, oldest first, with its nested stage runs by stage name."""
    _, runs = _mlflow(root)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return [
        (
            p,
            {
                r.data.tags["dvc.stage"]: r
                for r in runs
                if r.data.tags.get("mlflow.parentRunId") == p.info.run_id
            },
        )
        for p in parents
    ]


@pytest.mark.slow
def test_one_dvc_repro_is_one_mlflow_run_with_its_stages_nested(repo):
    """The first repro: one top-level run named for it, carrying every parameter, the stages'
    histories and the final metrics; data, train and evaluate nested under it, named by stage.
    The second repro ran nothing and recorded nothing."""
    root = repo["root"]
    client, _ = _mlflow(root)
    first = _dvc_runs(root)[0]
    parent, stages = first
    assert set(stages) == {"data", "train", "evaluate"}
    assert parent.info.run_name.startswith("dvc repro: ci tf_efficientnet_lite0")
    assert all(run.info.run_name.startswith(f"{s}: ci ") for s, run in stages.items())
    assert parent.info.status == "FINISHED" and parent.data.tags["dvc.last_stage"] == "evaluate"
    params = parent.data.params
    assert params["frozen.train.epochs"] == "1" and params["tta.beta"] == "0.25"
    assert params["ingest.layout"] == stages["data"].data.params["ingest.layout"]
    metrics = parent.data.metrics
    tta = stages["evaluate"].data.metrics["final_metrics.tta_accuracy"]
    assert metrics["final_metrics.tta_accuracy"] == tta
    steps = [m.step for m in client.get_metric_history(parent.info.run_id, "accuracy")]
    assert steps == [0, 1, 2]  # the three training stages' epochs, from the train stage
    assert {"seconds/data", "seconds/train", "seconds/evaluate"} <= set(metrics)
    tags = parent.data.tags
    assert tags["git_commit"] == stages["train"].data.tags["git_commit"] != ""
    assert tags["data_hash"] == stages["data"].data.tags["data_hash"]
    assert "version.torch" in tags


def _set_param(root: Path, key: str, value: str) -> None:
    """Edit a Kedro parameters file as a user would (one line), keeping its comments."""
    path = root / "conf" / "base" / "parameters_train.yml"
    lines = path.read_text().splitlines(keepends=True)
    stage, _, name = key.split(".")
    start = lines.index(f"{stage}:\n")
    for i in range(start, len(lines)):
        if lines[i].strip().startswith(f"{name}:"):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            lines[i] = f"{indent}{name}: {value}\n"
            break
    else:
        lines.insert(start + 3, f"    {name}: {value}\n")  # after `<<: *train_defaults`
    path.write_text("".join(lines))


@pytest.mark.slow
def test_a_training_parameter_reruns_train_and_evaluate_then_experiments(repo):
    root = repo["root"]
    shards = out(root, "05_model_input", "presized_large")
    before = {p: p.stat().st_mtime_ns for p in shards.rglob("*") if p.is_file()}
    old_model = sha256(out(root, "06_models", "mixup.pt"))

    _set_param(root, "mixup.train.wd", "0.05")
    log = dvc(root, "repro")
    assert ran(log) == ["params", "train", "evaluate"]
    diff = json.loads(dvc(root, "params", "diff", "--json"))
    change = diff[params_file(root)]["mixup.train.wd"]
    assert (change["old"], change["new"]) == (0.01, 0.05)
    # the persisted resume folder: the first two stages' inputs did not change, so their
    # finished runs are reused, and so is the lr_find sweep; mixup's settings differ
    text = " ".join(log.split())
    assert text.count("finished; reusing it") == 2, log[-4000:]
    assert "lr_find: " in text and "holds this sweep (same inputs)" in text, log[-4000:]
    assert re.search(
        r"mixup: \S+last\.pt was trained with other stage settings \(wd 0\.01 -> 0\.05\); "
        r"training from the start",
        text,
    ), log[-4000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the data stage's shards
    assert sha256(out(root, "06_models", "mixup.pt")) != old_model
    git(root, "add", "-A")
    git(root, "commit", "-qm", "wd 0.05")

    # two experiments on an evaluation parameter: only evaluate reruns
    for beta in ("0.5", "0.75"):
        log = dvc(root, "exp", "run", "-S", f"conf/base/parameters_evaluate.yml:tta.beta={beta}")
        assert ran(log) == ["params", "evaluate"]
    rows = json.loads(dvc(root, "exp", "show", "--json"))
    baseline = next(r for r in rows if r["rev"] != "workspace")
    exps = [e for r in rows for e in (r.get("experiments") or [])]
    assert len(exps) == 2
    exp_run = next(
        e["revs"][0]
        for e in exps
        if e["revs"][0]["data"]["params"][params_file(root)]["data"]["tta"]["beta"] == 0.5
    )

    def summary(entry) -> tuple[float, float, float]:
        data = entry["data"]
        metrics = data["metrics"][f"data/08_reporting/{ENV_NAME}/metrics.json"]["data"]
        params = data["params"][params_file(root)]["data"]
        return (
            params["mixup"]["train"]["wd"],
            params["tta"]["beta"],
            metrics["with_tta"]["accuracy"],
        )

    assert summary(baseline)[:2] == (0.05, 0.25)
    assert summary(exp_run)[:2] == (0.05, 0.5)
    for entry in (baseline, exp_run):
        assert 0 <= summary(entry)[2] <= 1

    # in MLflow: the repro, then each experiment, one top-level run each, named after DVC's
    # experiment, with its parameters and TTA accuracy as DVC shows them
    runs = _dvc_runs(root)
    repro, *experiments = runs[-3:]
    assert (
        set(repro[1]) == {"train", "evaluate"} and repro[0].data.params["mixup.train.wd"] == "0.05"
    )
    for e in exps:
        (rev,) = e["revs"]
        name = rev.get("name") or e.get("name")
        parent, stages = next(r for r in experiments if r[0].data.tags["dvc.experiment"] == name)
        assert parent.info.run_name.startswith(f"{name}: ") and set(stages) == {"evaluate"}
        wd, beta, tta = summary(rev)
        assert parent.data.params["tta.beta"] == str(beta) and parent.data.params[
            "mixup.train.wd"
        ] == str(wd)
        assert parent.data.metrics["final_metrics.tta_accuracy"] == pytest.approx(tta, abs=1e-12)
        assert parent.data.tags["dvc.baseline_rev"] == baseline["rev"]


@pytest.mark.slow
def test_a_parameter_in_the_environments_file_reruns_train(repo):
    """conf/ci is the environment in use: its own file counts, key by key."""
    root = repo["root"]
    env_file = root / "conf" / ENV_NAME / "parameters.yml"
    params = yaml.safe_load(env_file.read_text())
    params["unfrozen"]["train"]["wd"] = 0.02
    env_file.write_text(yaml.safe_dump(params))
    log = dvc(root, "repro")
    assert ran(log) == ["params", "train", "evaluate"]
    text = " ".join(log.split())
    assert "frozen: " in text and text.count("finished; reusing it") == 1, log[-4000:]
    assert re.search(
        r"unfrozen: \S+ was trained with other stage settings \(wd 0\.01 -> 0\.02\)", text
    ), log[-4000:]
    # mixup starts from unfrozen's new weights
    assert re.search(r"mixup: \S+ started from other weights", text), log[-4000:]
    git(root, "add", "-A")
    git(root, "commit", "-qm", "unfrozen wd 0.02 in conf/ci")
    assert json.loads(dvc(root, "status", "--json")) == {}


@pytest.mark.slow
def test_push_then_pull_restores_the_checkpoints_bit_for_bit(repo, tmp_path):
    root = repo["root"]
    models = root / "data" / "06_models" / ENV_NAME
    hashes = {name: sha256(models / name) for name in CHECKPOINTS}
    resume = {p.relative_to(models): sha256(p) for p in (models / "resume").rglob("*.pt")}
    assert resume  # the per-epoch checkpoints are an output too (persist: true)
    dvc(root, "remote", "add", "--local", "-d", "storage", str(tmp_path / "remote"))
    dvc(root, "push")

    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(models)
    shutil.rmtree(root / "data" / "05_model_input" / ENV_NAME)
    assert "deleted" in dvc(root, "status")
    dvc(root, "pull")
    assert {name: sha256(models / name) for name in CHECKPOINTS} == hashes
    assert {p.relative_to(models): sha256(p) for p in (models / "resume").rglob("*.pt")} == resume
    assert json.loads(dvc(root, "status", "--json")) == {}


@pytest.mark.slow
def test_the_cv_stages_run_each_fold_then_rerun_only_the_fold_that_changed(repo):
    """cassava_cv's stages (cv_folds, cv_fold@<k> by foreach, cv_report) added to a project whose
    recipe has run: they run once; one fold's outputs lost, only that fold reruns."""
    root = repo["root"]
    path = root / "dvc.yaml"
    path.write_text(path.read_text().replace("\n# dvc plots", f"{repo['cv_stages']}\n# dvc plots"))
    log = dvc(root, "repro")
    assert ran(log, STAGES + CV_STAGES) == list(CV_STAGES), log[-4000:]
    assert json.loads(dvc(root, "status", "--json")) == {}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(CV_STAGES) <= set(lock)
    metrics = json.loads(dvc(root, "metrics", "show", "--json"))[""]["data"]
    cv = metrics[f"data/08_reporting/{ENV_NAME}/cv_metrics.json"]["data"]
    assert cv["folds"] == 2 and 0 <= cv["accuracy"] <= 1  # (DVC leaves the interval's list out)
    ensemble = load_model_file(out(root, "06_models", "cv_ensemble.safetensors").read_bytes())
    assert len(ensemble.members) == 2
    # MLflow: each fold stage's run holds its fold's run, nested under it
    client, runs = _mlflow(root)
    folds = {r.data.tags["cv_fold"]: r for r in runs if "cv_fold" in r.data.tags}
    assert sorted(folds) == ["fold_0", "fold_1"]
    for k, run in enumerate(folds[f"fold_{k}"] for k in range(2)):
        stage = client.get_run(run.data.tags["mlflow.parentRunId"])
        assert stage.data.tags["dvc.stage"] == f"cv_fold@{k}"
        assert run.info.status == "FINISHED" and "final_metrics.tta_accuracy" in run.data.metrics

    # one fold's model lost: that fold alone reruns, and gives the same bytes again
    model = out(root, "06_models", "cv/fold_1/mixup.pt")
    before = sha256(model)
    model.unlink()
    # the report depends on every fold's model (the ensemble): it is stale too, until the fold
    # comes back with the same bytes
    assert set(json.loads(dvc(root, "status", "--json"))) == {"cv_fold@1", "cv_report"}
    log = dvc(root, "repro")
    assert ran(log, CV_STAGES) in (["cv_fold@1"], ["cv_fold@1", "cv_report"]), log[-4000:]
    assert sha256(model) == before


def _imported_files(module: str) -> set[str]:
    """Files of cassava_pipeline a module imports, transitively (package __init__ left out)."""
    src = REPO / "src"
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = src / f"{name.replace('.', '/')}.py"
        if not path.exists():
            path = src / name.replace(".", "/") / "__init__.py"
        if not path.exists() or path in seen:
            continue
        seen.add(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                if base.startswith("cassava_pipeline"):
                    todo += [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("cassava_pipeline")]
    return {str(p.relative_to(REPO)) for p in seen if p.name != "__init__.py"}


HOOKS = "src/cassava_pipeline/hooks"


@pytest.mark.parametrize(
    ("stage", "pipelines"),
    [
        ("sample", ["sample_data"]),
        ("data", ["ingest", "presize"]),
        ("train", ["train"]),
        ("evaluate", ["evaluate"]),
        ("cv_folds", ["cv"]),
        ("cv_fold", ["cv"]),
        ("cv_report", ["cv"]),
    ],
)
def test_each_stage_depends_on_the_code_it_runs(stage, pipelines):
    definition = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    deps = definition.get("do", definition)["deps"]  # a foreach stage's under `do`

    def covered(path: str) -> bool:
        return any(path == d or path.startswith(f"{d.rstrip('/')}/") for d in deps)

    needed = set().union(*(_imported_files(f"cassava_pipeline.pipelines.{p}") for p in pipelines))
    needed |= {f"src/cassava_pipeline/pipelines/{p}/pipeline.py" for p in pipelines}
    if stage != "sample":  # the project's settings, config loader and hooks shape every run
        needed |= {f"src/cassava_pipeline/{m}.py" for m in ("settings", "config")}
        needed |= {str(p.relative_to(REPO)) for p in (REPO / HOOKS).glob("*.py")}
    assert sorted(p for p in needed if not covered(p)) == []
    assert all((REPO / d).exists() for d in deps if not d.startswith(("${", "data/")))
