"""The recipe in fastai and in this pipeline, side by side on real photos: accuracy and time,
with the same work timed between the same points on both sides and each stage set against the
model's own arithmetic (the floor), measured in the same run.

    make bench-env   # .venv-bench: the project's lock plus fastai (benchmark-only)
    .venv-bench/bin/python benchmarks/fastai_compare.py [--seeds 0 1 2] [--train-limit N]

Data: ``../shared/datasets/clothing-small`` (``train/`` and ``validation/``, a folder per class).
``--train-limit`` keeps that many training photos (stratified, the same for both); the
validation folder is always used whole.

The two arms, each in its fastest correct configuration on this machine:
- fastai 2.8.12 as its documentation has it, plus what fastai itself offers for speed here:
  channels-last through ``Learner.to_channelslast(use_amp=False)`` (its ``ChannelsLast``
  callback; its fp16 autocast is for CUDA, and bf16 is 8 to 12x slower on this CPU, see
  RESULTS.md), and the DataLoader worker count that a probe, run first by this script, finds
  fastest (``--fastai-workers`` skips the probe).
- ours: ``kedro run --pipelines=cassava`` in the project's default configuration, as a user runs
  it (ingest, split, presize, lr_find, the three stages, TTA evaluation, interpretation, figures,
  the exported model, MLflow tracking), every seed in the same temporary project.

The same allocator on every side: glibc's malloc with the settings of
``cassava_pipeline.vision.allocator`` (the mmap threshold at its largest, freed memory kept for
reuse). Ours sets them itself (``runtime.malloc: tuned``, its default); this script makes the
same ``mallopt`` calls first thing in fastai's process, the probe's and the floor's, so that
the comparison is of the code, not of the allocator: left at glibc's defaults, a training step
page-faults its activations in again each time, which costs a third of the time on this CPU
(RESULTS.md) whichever library runs the step.

The same work on both sides: the same architecture and packaged ImageNet weights
(tf_efficientnet_lite0 with fastai's head, built by ``vision.models.create_model`` with the same
seed), the same two parameter groups, presize (fastai: ``Resize(presize)`` item transform;
ours: presized shards), ``aug_transforms(size, min_scale=0.75)``, batch size, lr_find (timed;
both then use the same fixed learning rates), ``fit_one_cycle`` frozen at the small size,
unfrozen at the large size with discriminative rates, then MixUp(0.2) with the optimizer state
carried on from the unfrozen stage (fastai's Learner; ours' ``optimizer_state: fastai``), then
TTA: one plain pass and ``n=4`` augmented passes over the validation set, blended with
``beta=0.25`` (fastai: ``learn.tta(beta=None)`` returns both, so that no extra ``validate`` is
needed for the plain accuracy). Each stage keeps its best epoch by accuracy (ours:
``monitor: accuracy``; fastai: ``SaveModelCallback(monitor='accuracy')``, which saves to disk and
reloads the best epoch).

The same points on both sides. A stage is the whole stage: fastai from the line that switches
its data or freezing to the end of ``fit_one_cycle`` (callbacks, saves and the reload of the best
epoch included); ours the Kedro node from loading its first input to saving its last output
(checkpoints, resume files, MLflow logging included), as ``NodeTimesHooks`` records it in the
MLflow run. ``lr_find`` and the evaluation are timed the same way; ``total`` is the child
process's wall time, interpreter start and imports included.

The floor: each stage's model work alone (the same optimizer steps and validation passes on
random tensors already in memory, channels-last, no data, augmentation or bookkeeping), timed by
a child of this script in the same run, right before and right after every arm's run (the one
after an arm is the one before the next). An arm's floor is the mean of the two measurements
around it, figure by figure: the machine drifts during a run (one stage's floor moved from 28 to
45 s between seeds), so each arm is set against the floor at the same moment. The ratios
against the run's median floor are printed too. lr_find's floor is its time per step times the
steps the arm's sweep took (both stop early when the loss diverges). ``--no-floor`` measures
no floor (accuracy and the two arms' times only): more seeds in the same time, to tell whether
an accuracy gap is more than the seeds' noise.

Targets (issue 15): ours at most 1.05x the floor for each training stage, and ours' total (start
to end: imports, data, lr_find, tracking, export, figures) at most 1.25x the sum of the floors.
Accuracy (issue 6): ours at least fastai's mean minus one standard deviation over seeds. Three
seeds; five if either arm's accuracy spread exceeds 0.02.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "clothing-small"


STAGES = ("frozen", "unfrozen", "mixup")


def add_recipe_args(
    p: argparse.ArgumentParser, epochs: tuple[int, int, int] = (1, 1, 1), lr_find_iters: int = 100
) -> None:
    """The flags :func:`recipe` reads (``cv.py`` shares them)."""
    p.add_argument("--presize-small", type=int, default=160)
    p.add_argument("--size-small", type=int, default=128)
    p.add_argument("--presize-large", type=int, default=192)
    p.add_argument("--size-large", type=int, default=160)
    p.add_argument("--epochs", type=int, nargs=3, default=list(epochs))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-find-iters", type=int, default=lr_find_iters)


def recipe(args: argparse.Namespace) -> dict:
    """The settings both arms use (fastai's defaults where the flag is not given)."""
    return {
        "presize": (args.presize_small, args.presize_large),
        "size": (args.size_small, args.size_large),
        "epochs": tuple(args.epochs),  # frozen, unfrozen, mixup
        "lr_frozen": args.lr,
        "lr_unfrozen": (args.lr / 200, args.lr / 2),  # slice(lr/200, lr/2)
        "lr_mixup": (args.lr / 2000, args.lr / 20),
        "mixup": 0.2,
        "batch_size": args.batch_size,
        "lr_find_iters": args.lr_find_iters,
        "tta_n": 4,
        "tta_beta": 0.25,
        "min_scale": 0.75,
        "wd": 0.01,
    }


# ---- data ---------------------------------------------------------------------------------------


def prepare_data(root: Path, limit: int | None) -> Path:
    """A folder of links: train/<class>/ (at most ``limit`` in all, stratified) and validation/."""
    out = root / "clothing"
    for side in ("train", "validation"):
        classes = sorted(p.name for p in (DATA / side).iterdir() if p.is_dir())
        files = {c: sorted((DATA / side / c).iterdir()) for c in classes}
        total = sum(len(v) for v in files.values())
        for c, paths in files.items():
            keep = paths
            if side == "train" and limit:
                keep = paths[: max(1, round(len(paths) * limit / total))]
            (out / side / c).mkdir(parents=True)
            for p in keep:
                (out / side / c / p.name).symlink_to(p)
    return out


# ---- fastai arm ----------------------------------------------------------------------------------


def _fastai_learner(data: Path, seed: int, r: dict, workers: int, presize: int, size: int):
    """fastai's DataLoaders and Learner for the recipe, channels-last through its own API."""
    import torch
    from fastai.callback.channelslast import to_channelslast  # noqa: F401  (patches Learner)
    from fastai.data.transforms import Normalize
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.vision.augment import Resize, aug_transforms
    from fastai.vision.data import ImageDataLoaders

    from cassava_pipeline.vision.models import create_model, param_groups

    def loaders(presize: int, size: int):
        return ImageDataLoaders.from_folder(
            data,
            train="train",
            valid="validation",
            item_tfms=Resize(presize),
            batch_tfms=[
                *aug_transforms(size=size, min_scale=r["min_scale"]),
                Normalize.from_stats([0.5] * 3, [0.5] * 3),  # lite0's statistics
            ],
            bs=r["batch_size"],
            num_workers=workers,
            seed=seed,
            device=torch.device("cpu"),
        )

    dls = loaders(presize, size)
    torch.manual_seed(seed)
    model, _ = create_model("tf_efficientnet_lite0", len(dls.vocab), "packaged")
    learn = Learner(
        dls,
        model,
        loss_func=CrossEntropyLossFlat(),
        metrics=accuracy,
        splitter=param_groups,
        wd=r["wd"],
    )
    learn.to_channelslast(use_amp=False)  # fastai's ChannelsLast callback, no CUDA autocast
    learn.freeze()
    return learn, loaders


def run_fastai(data: Path, seed: int, r: dict, work: Path, workers: int) -> dict:
    t0 = time.perf_counter()
    import torch
    from fastai.callback.mixup import MixUp
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner)
    from fastai.callback.tracker import SaveModelCallback
    from fastai.torch_core import set_seed

    set_seed(seed, reproducible=True)
    learn, loaders = _fastai_learner(data, seed, r, workers, r["presize"][0], r["size"][0])
    learn.path = work
    times: dict[str, float] = {}
    t = time.perf_counter()
    times["setup"] = t - t0  # imports, DataLoaders, model

    with learn.no_logging():
        learn.lr_find(num_it=r["lr_find_iters"], show_plot=False)
    lr_find_steps = len(learn.recorder.lrs)
    t = _lap(times, "lr_find", t)

    def best() -> float:  # the kept epoch's accuracy (SaveModelCallback reloads it)
        return max(float(v[2]) for v in learn.recorder.values)

    def keep_best(stage: str):  # ours keeps each stage's best epoch (`monitor: accuracy`)
        return SaveModelCallback(monitor="accuracy", fname=f"best-{stage}", with_opt=False)

    stage_acc = {}
    with learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(r["epochs"][0], r["lr_frozen"], cbs=keep_best("frozen"))
        stage_acc["frozen"] = best()
        t = _lap(times, "frozen", t)
        learn.dls = loaders(r["presize"][1], r["size"][1])
        learn.unfreeze()  # clears the optimizer's state, as ours at the change of freeze
        learn.fit_one_cycle(r["epochs"][1], slice(*r["lr_unfrozen"]), cbs=keep_best("unfrozen"))
        stage_acc["unfrozen"] = best()
        t = _lap(times, "unfrozen", t)
        mix = [MixUp(r["mixup"]), keep_best("mixup")]  # the optimizer's state goes on
        learn.fit_one_cycle(r["epochs"][2], slice(*r["lr_mixup"]), cbs=mix)
        stage_acc["mixup"] = best()
        t = _lap(times, "mixup", t)
        # one plain and n augmented passes, as ours; beta=None returns both, unblended
        (augmented, plain), targs = learn.tta(n=r["tta_n"], beta=None)
        blended = torch.lerp(augmented, plain, r["tta_beta"])
        _lap(times, "evaluate", t)
    return {
        "accuracy": float((plain.argmax(1) == targs).float().mean()),
        "tta_accuracy": float((blended.argmax(1) == targs).float().mean()),
        "times": times,
        "stages": stage_acc,
        "lr_find_steps": lr_find_steps,
    }


def _lap(times: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    times[name] = now - since
    return now


def probe_fastai_workers(data: Path, seed: int, r: dict, work: Path, candidates: list[int]) -> dict:
    """fastai's frozen stage (one epoch, channels-last) with each DataLoader worker count."""
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401

    seconds = {}
    for workers in candidates:
        learn, _ = _fastai_learner(data, seed, r, workers, r["presize"][0], r["size"][0])
        with learn.no_logging(), learn.no_bar():
            t = time.perf_counter()
            learn.fit_one_cycle(1, r["lr_frozen"])
            seconds[str(workers)] = time.perf_counter() - t
    return {"seconds": seconds}


# ---- our arm -------------------------------------------------------------------------------------

# Kedro node -> the figure it is timed as
NODES = {
    "lr_find": "lr_find",
    "frozen.train_stage": "frozen",
    "unfrozen.train_stage": "unfrozen",
    "mixup.train_stage": "mixup",
    "evaluate": "evaluate",
}


def _params(seed: int, r: dict) -> dict:
    def stage(i: int, **extra) -> dict:
        train = {"epochs": r["epochs"][i], "size": r["size"][min(i, 1)], "seed": seed}
        loader = {"batch_size": r["batch_size"]}
        return {"train": {**train, "loader": loader, "wd": r["wd"], **extra}}

    params = {
        "ingest": {"layout": "folder", "folder": {"valid_folder": "validation"}},
        "small": {"presize": {"size": r["presize"][0]}},
        "large": {"presize": {"size": r["presize"][1]}},
        "model": {"seed": seed},
        "runtime": {"accelerator": "cpu", "progress": False},
        # swept as fastai's arm does, though both then train at the same fixed rates
        "lr_find": {"num_it": r["lr_find_iters"], "always": True},
        "tta": {"n": r["tta_n"], "beta": r["tta_beta"], "seed": seed},
        "frozen": stage(0, lr=r["lr_frozen"]),
        "unfrozen": stage(1, lr=list(r["lr_unfrozen"])),
        "mixup": stage(2, lr=list(r["lr_mixup"]), mixup=r["mixup"]),
    }
    for key, value in r.get("ours_params", {}).items():  # an A/B arm's (benchmarks/ab_pixels.py)
        node = params
        *parents, leaf = key.split(".")  # dotted: small.presize.jpeg_draft
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params


def make_project(root: Path, data: Path) -> Path:
    """A copy of this project whose ``raw_images`` is ``data``: one for all our runs, as a user
    reruns one project with other seeds (its MLflow store is created by the first run)."""
    import yaml

    root.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    shutil.copytree(REPO / "src", root / "src")
    (root / "conf" / "local").mkdir()
    catalog = {"raw_images": {"type": "cassava_pipeline.datasets.ImageRootDataset",
                              "path": str(data)}}  # fmt: skip
    (root / "conf" / "local" / "catalog.yml").write_text(yaml.safe_dump(catalog))
    return root


def run_ours(data: Path, seed: int, r: dict, work: Path, workers: int) -> dict:
    """``kedro run --pipelines=cassava``, as a user runs it, with this seed's parameters; the
    stages' times are the nodes' own, as the run recorded them in MLflow."""
    import pandas as pd
    import yaml
    from mlflow.tracking import MlflowClient

    root = work.parent / "ours-project"
    (root / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(_params(seed, r)))
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--pipelines=cassava"],
        cwd=root, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"kedro run --pipelines=cassava:\n{proc.stderr[-4000:]}")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cassava_pipeline")
    (run,) = client.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    metrics = run.data.metrics
    times = {figure: metrics[f"seconds/{node}"] for node, figure in NODES.items()}
    nodes = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("seconds/")}
    reports = root / "data" / "08_reporting"
    history = {s: pd.read_csv(reports / f"history_{s}.csv") for s in STAGES}
    sweep = json.loads((reports / "lr_find.json").read_text())
    return {
        "accuracy": metrics["final_metrics.accuracy"],
        "tta_accuracy": metrics["final_metrics.tta_accuracy"],
        "times": times,
        "epochs_only": {s: float(h["seconds"].sum()) for s, h in history.items()},
        "stages": {s: float(h["accuracy"].max()) for s, h in history.items()},
        "lr_find_steps": len(sweep["lrs"]),
        "nodes": nodes,  # every node's time: where "rest" goes
    }


def run_model_only(data: Path, seed: int, r: dict, work: Path, workers: int) -> dict:
    """The floor: each stage's model work alone (the same optimizer steps and validation passes,
    on random tensors already in memory, channels-last as both arms): no data, no bookkeeping.
    lr_find: seconds per step of the frozen model at the small size."""
    import torch
    import torch.nn.functional as F

    from cassava_pipeline.vision.learner import StageConfig, make_optimizer
    from cassava_pipeline.vision.models import create_model, freeze, param_groups, unfreeze

    n_train = sum(1 for _ in (data / "train").rglob("*.jpg"))
    n_valid = sum(1 for _ in (data / "validation").rglob("*.jpg"))
    n_classes = sum(1 for p in (data / "train").iterdir() if p.is_dir())
    bs = r["batch_size"]
    torch.manual_seed(seed)
    model, _ = create_model("tf_efficientnet_lite0", n_classes, "packaged")
    model.to(memory_format=torch.channels_last)
    valid_batches = [min(bs, n_valid - k) for k in range(0, n_valid, bs)]

    def batch(size: int):
        x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, n_classes, (bs,))

    def train_steps(opt, x, y, n: int) -> None:
        model.train()
        for _ in range(n):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def valid_pass(x) -> None:
        model.eval()
        with torch.no_grad():
            for b in valid_batches:
                model(x[:b])

    def optimizer(epochs: int):
        cfg = StageConfig(name="floor", epochs=epochs, lr=1e-4, wd=r["wd"])
        return make_optimizer(model, [1e-6] * len(param_groups(model)), cfg)

    times: dict[str, float] = {}
    freeze(model)
    x, y = batch(r["size"][0])
    opt = optimizer(1)
    t = time.perf_counter()
    train_steps(opt, x, y, r["lr_find_iters"])
    per_step = (time.perf_counter() - t) / r["lr_find_iters"]
    for i, stage in enumerate(STAGES):
        (freeze if i == 0 else unfreeze)(model)
        x, y = batch(r["size"][min(i, 1)])
        opt = optimizer(r["epochs"][i])
        t = time.perf_counter()
        for _ in range(r["epochs"][i]):
            train_steps(opt, x, y, n_train // bs)  # drop_last, as both loaders
            valid_pass(x)
        times[stage] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(r["tta_n"] + 1):  # one plain pass and n augmented ones
        valid_pass(x)
    times["evaluate"] = time.perf_counter() - t
    return {"times": times, "lr_find_per_step": per_step}


# ---- driver --------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import torch

    from cassava_pipeline.vision.allocator import tune_malloc

    if args.child != "ours":  # ours' kedro run sets them itself (runtime.malloc: tuned)
        tune_malloc()
    torch.set_num_threads(os.cpu_count() or 1)
    r = json.loads(args.recipe)
    work = Path(args.work)
    data = Path(args.data)
    if args.child == "probe":
        out = probe_fastai_workers(data, args.seed, r, work, args.probe)
    else:
        run = {"fastai": run_fastai, "ours": run_ours, "model": run_model_only}[args.child]
        out = run(data, args.seed, r, work, args.fastai_workers)
    print("\nRESULT " + json.dumps(out), flush=True)


def spawn(arm: str, data: Path, seed: int, r: dict, tmp: Path, args) -> dict:
    work = tmp / f"{arm}-{seed}"
    work.mkdir()
    extra = (
        ["--fastai-workers", str(args.fastai_workers)] if args.fastai_workers is not None else []
    )
    if arm == "probe":
        extra += ["--probe", *map(str, args.probe)]
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", arm, "--seed", str(seed), "--data", str(data),
         "--work", str(work), "--recipe", json.dumps(r), *extra],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t
    # fastai's progress bars end with a carriage return, not a newline: find the marker anywhere
    lines = [ln.split("RESULT ", 1)[1] for ln in proc.stdout.splitlines() if "RESULT " in ln]
    if proc.returncode or not lines:
        raise RuntimeError(f"{arm} seed {seed} failed:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}")
    out = json.loads(lines[-1])
    out["total"] = wall  # the whole process: interpreter start and imports included
    shutil.rmtree(work, ignore_errors=True)
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def floors(floor: dict, lr_find_steps: float) -> dict[str, float]:
    """The floor of each timed figure, lr_find's for the steps an arm's sweep took."""
    return {"lr_find": floor["lr_find_per_step"] * lr_find_steps, **floor["times"]}


def combined_floor(measured: list[dict], how=statistics.median) -> dict:
    """Each figure of the floor combined over measurements (median, or mean of two)."""
    return {
        "times": {k: how([m["times"][k] for m in measured]) for k in measured[0]["times"]},
        "lr_find_per_step": how([m["lr_find_per_step"] for m in measured]),
    }


def report(results: dict[str, list[dict]], measured: list[dict]) -> None:
    """Every figure RESULTS.md quotes, from this run's raw results."""
    timed = ("lr_find", *STAGES, "evaluate")
    median = combined_floor(measured) if measured else None
    for arm in results.values():
        for out in arm:
            if median is not None:
                around = [measured[i] for i in out["floors_around"]]
                out["floors"] = floors(
                    combined_floor(around, statistics.fmean), out["lr_find_steps"]
                )
                out["median_floors"] = floors(median, out["lr_find_steps"])
            out["times"]["rest"] = out["total"] - sum(out["times"][k] for k in timed)
    print(f"\nseeds: {[o['seed'] for o in results['ours']]}")
    print("\n| figure | fastai mean ± sd | ours mean ± sd |\n| --- | ---: | ---: |")
    summary: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {}
    rows = [(k, lambda o, k=k: o[k]) for k in ("accuracy", "tta_accuracy")]
    rows += [(f"{k} stage accuracy", lambda o, k=k: o["stages"][k]) for k in STAGES]
    rows += [("total", lambda o: o["total"])]
    rows += [(f"{k} time", lambda o, k=k: o["times"][k]) for k in (*timed, "rest")]
    rows += [("lr_find steps", lambda o: o["lr_find_steps"])]
    for key, get in rows:
        f = mean_sd([get(o) for o in results["fastai"]])
        o = mean_sd([get(x) for x in results["ours"]])
        summary[key] = (f, o)
        if "time" in key or key == "total":
            fmt = "{:.1f} ± {:.1f} s"
        elif "steps" in key:
            fmt = "{:.1f} ± {:.1f}"
        else:
            fmt = "{:.4f} ± {:.4f}"
        print(f"| {key} | {fmt.format(*f)} | {fmt.format(*o)} |")

    if median is not None:
        report_floors(results, timed)
    report_rest(results)
    report_verdicts(results, summary)


def report_floors(results: dict[str, list[dict]], timed: tuple[str, ...]) -> None:
    """Each arm's times over the model-only floor measured around it."""
    print("\nEach arm against the floor measured around it (mean ratio over seeds); in brackets,"
          " against the run's median floor:")  # fmt: skip
    print("\n| figure | floor (model only) | fastai / floor | ours / floor | ours target |")
    print("| --- | ---: | ---: | ---: | --- |")

    def ratio_of(arm: str, k: str, key: str = "floors") -> float:
        return statistics.fmean(o["times"][k] / o[key][k] for o in results[arm])

    for k in timed:
        fl = {a: statistics.fmean(o["floors"][k] for o in results[a]) for a in results}
        ratio = {a: f"{ratio_of(a, k):.3f} ({ratio_of(a, k, 'median_floors'):.3f})"
                 for a in results}  # fmt: skip
        target = ""
        if k in STAGES:
            met = all(o["times"][k] <= 1.05 * o["floors"][k] for o in results["ours"])
            target = f"<= 1.05: {'met' if met else 'MISSED'}"
        shown = f"{fl['ours']:.1f} s" if abs(fl["ours"] - fl["fastai"]) < 0.05 else (
            f"{fl['fastai']:.1f} s / {fl['ours']:.1f} s")  # fmt: skip
        print(f"| {k} | {shown} | {ratio['fastai']} | {ratio['ours']} | {target} |")

    def total_ratio(arm: str, key: str = "floors") -> float:
        return statistics.fmean(o["total"] / sum(o[key].values()) for o in results[arm])

    met = all(o["total"] <= 1.25 * sum(o["floors"].values()) for o in results["ours"])
    sum_floor = statistics.fmean(sum(o["floors"].values()) for o in results["ours"])
    print(f"| whole run (total) | {sum_floor:.1f} s (sum) | {total_ratio('fastai'):.3f} "
          f"({total_ratio('fastai', 'median_floors'):.3f}) | {total_ratio('ours'):.3f} "
          f"({total_ratio('ours', 'median_floors'):.3f}) | <= 1.25: "
          f"{'met' if met else 'MISSED'} |")  # fmt: skip


def report_rest(results: dict[str, list[dict]]) -> None:
    """Where ours' time outside the timed parts goes, and every run's own line."""
    rest_nodes = {
        node: statistics.fmean(o["nodes"].get(node, 0.0) for o in results["ours"])
        for node in results["ours"][0]["nodes"]
        if node not in NODES and node != "run"
    }
    run_span = statistics.fmean(o["nodes"]["run"] for o in results["ours"])
    print("\nours' rest, node by node (means): " + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(rest_nodes.items(), key=lambda kv: -kv[1])
    ) + f"; outside the nodes (start-up, imports, Kedro, MLflow set-up and end): "
        f"{statistics.fmean(o['total'] for o in results['ours']) - run_span:.1f} s")  # fmt: skip
    for arm, outs in results.items():
        for out in outs:
            rounded = {k: round(v, 1) for k, v in out["times"].items()}
            extra = {k: round(v, 1) for k, v in out.get("epochs_only", {}).items()}
            print(f"# {arm} seed {out['seed']}: acc {out['accuracy']:.4f} tta "
                  f"{out['tta_accuracy']:.4f} total {out['total']:.1f} times {json.dumps(rounded)}"
                  + (f" epochs only {json.dumps(extra)}" if extra else ""))  # fmt: skip


def report_verdicts(results: dict[str, list[dict]], summary: dict) -> None:
    """Accuracy against fastai's mean minus one sd, the time ratio, and Welch's t-tests."""
    (fa, fs), (oa, _) = summary["accuracy"]
    (fta, fts), (ota, _) = summary["tta_accuracy"]
    (ft, _), (ot, _) = summary["total"]
    print(f"\naccuracy: ours {oa:.4f} vs fastai {fa:.4f} - {fs:.4f} = {fa - fs:.4f}: "
          f"{'met' if oa >= fa - fs else 'MISSED'}")  # fmt: skip
    print(f"tta accuracy: ours {ota:.4f} vs fastai {fta:.4f} - {fts:.4f} = {fta - fts:.4f}: "
          f"{'met' if ota >= fta - fts else 'MISSED'}")  # fmt: skip
    print(f"time: ours / fastai = {ot / ft:.3f} (total wall time, means over seeds)")
    if min(len(outs) for outs in results.values()) > 1:  # is a gap more than the seeds' noise?
        from scipy.stats import ttest_ind

        for key in ("accuracy", "tta_accuracy"):
            t = ttest_ind(*([o[key] for o in results[a]] for a in ("fastai", "ours")),
                          equal_var=False)  # fmt: skip
            print(f"{key}: Welch's t-test, fastai against ours: t = {t.statistic:.2f}, "
                  f"p = {t.pvalue:.3f} ({t.df:.1f} degrees of freedom)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--more-seeds", type=int, nargs="*", default=[3, 4],
                   help="run too when either arm's accuracy spread exceeds --spread")  # fmt: skip
    p.add_argument("--spread", type=float, default=0.02)
    p.add_argument("--train-limit", type=int, default=None)
    add_recipe_args(p)
    p.add_argument("--fastai-workers", type=int, default=None,
                   help="fastai's DataLoader workers (default: the probe's fastest)")  # fmt: skip
    p.add_argument("--probe", type=int, nargs="+", default=[0, 1, 2],
                   help="worker counts the probe tries")  # fmt: skip
    p.add_argument("--floor-only", action="store_true", help="only the model-only floor")
    p.add_argument("--no-floor", action="store_true",
                   help="no floor measurements: accuracy and the two arms' times only, for more "
                   "seeds in the same time")  # fmt: skip
    p.add_argument("--child", choices=["fastai", "ours", "model", "probe"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if not DATA.exists():
        sys.exit(f"{DATA} is missing (the shared data sets; see ../shared/datasets/README.md)")
    import fastai
    import torch

    r = recipe(args)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, fastai {fastai.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print(f"# {' '.join(sys.argv)}")
    print(f"# recipe: {json.dumps(r)}, train limit {args.train_limit}")
    results: dict[str, list[dict]] = {"fastai": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(Path(tmp), args.train_limit)
        make_project(Path(tmp) / "ours-project", data)
        n_train = sum(1 for _ in (data / "train").rglob("*.jpg"))
        n_valid = sum(1 for _ in (data / "validation").rglob("*.jpg"))
        print(f"# clothing-small: {n_train} training and {n_valid} validation photos")
        measured: list[dict] = []

        def measure_floor(seed: int) -> None:
            if args.no_floor:
                return
            floor = spawn("model", data, seed, r, Path(tmp), args)
            measured.append(floor)
            print("model-only floor: " + " ".join(f"{k}={v:.1f}" for k, v in floor["times"].items())
                  + f" lr_find={floor['lr_find_per_step']:.3f}/step", flush=True)  # fmt: skip

        if args.floor_only:
            measure_floor(args.seeds[0])
            return
        if args.fastai_workers is None:
            probe = spawn("probe", data, args.seeds[0], r, Path(tmp), args)["seconds"]
            print(
                "fastai workers probe (one frozen epoch, channels-last): "
                + " ".join(f"{w} workers {s:.1f} s" for w, s in probe.items()),
                flush=True,
            )
            args.fastai_workers = int(min(probe, key=probe.get))
        print(f"# fastai DataLoader workers: {args.fastai_workers}", flush=True)
        measure_floor(args.seeds[0])  # right before the first arm

        def run_seeds(seeds: list[int], first: int) -> None:
            for i, seed in enumerate(seeds, start=first):
                order = ("fastai", "ours") if i % 2 == 0 else ("ours", "fastai")
                for arm in order:
                    out = spawn(arm, data, seed, r, Path(tmp), args)
                    measure_floor(seed)  # after this arm, before the next: the machine drifts
                    if measured:
                        out["floors_around"] = (len(measured) - 2, len(measured) - 1)
                    out["seed"] = seed
                    results[arm].append(out)
                    stages = " ".join(f"{k}={v:.1f}" for k, v in out["times"].items())
                    print(f"{arm:6s} seed {seed}: accuracy {out['accuracy']:.4f} "
                          f"tta {out['tta_accuracy']:.4f} total {out['total']:.1f} s ({stages})",
                          flush=True)  # fmt: skip

        run_seeds(args.seeds, 0)
        spreads = {
            (arm, key): mean_sd([o[key] for o in outs])[1]
            for arm, outs in results.items()
            for key in ("accuracy", "tta_accuracy")
        }
        wide = {k: v for k, v in spreads.items() if v > args.spread}
        if wide and args.more_seeds:
            print(f"# spread over {args.spread}: {wide}; seeds {args.more_seeds} too", flush=True)
            run_seeds(args.more_seeds, len(args.seeds))
    report(results, measured)


if __name__ == "__main__":
    main()
