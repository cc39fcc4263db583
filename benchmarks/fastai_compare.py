"""The recipe in fastai and in this pipeline, side by side on real photos: accuracy and time.

    make bench-env   # .venv-bench: the project's lock plus fastai (benchmark-only)
    .venv-bench/bin/python benchmarks/fastai_compare.py [--seeds 0 1 2] [--train-limit N]

Data: ``../shared/datasets/clothing-small`` (``train/`` and ``validation/``, a folder per class).
``--train-limit`` keeps that many training photos (stratified, the same for both); the
validation folder is always used whole.

Both arms do the same work with the same settings: the same architecture and packaged ImageNet
weights (tf_efficientnet_lite0 with fastai's head, built by ``vision.models.create_model`` with
the same seed), the same two param groups, presize (fastai: ``Resize(presize)`` item transform;
ours: presized shards), ``aug_transforms(size, min_scale=0.75)``, batch size, lr_find (timed
only: both then use the same fixed learning rates), ``fit_one_cycle`` frozen at the small size,
unfrozen at the large size with discriminative rates, then MixUp(0.2), then ``tta(n=4,
beta=0.25)``; each stage keeps its best epoch by accuracy (ours: ``monitor: accuracy``;
fastai: ``SaveModelCallback(monitor='accuracy')``). Ours is the Kedro pipeline itself, run as a
user runs it: ``kedro run --pipelines=cassava`` (ingest, split, presize, lr_find, the three
stages, TTA evaluation, interpretation, figures, the exported model, MLflow tracking), every
seed in the same temporary project, so the first run creates its MLflow store; fastai is one
Python process. Each arm runs in its own process, one at a time, alternating which goes first;
times are wall-clock seconds including interpreter start and imports.

A third child, run once, times the floor: each stage's model work alone (the same steps and
validation passes on random tensors in memory, no data or bookkeeping); ``--floor-only`` runs
just that.

Targets (issue 6): our accuracy at least fastai's mean minus one spread (the standard deviation
over seeds), and our total time at most 0.6 of fastai's.
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


def run_fastai(data: Path, seed: int, r: dict, work: Path) -> dict:
    t0 = time.perf_counter()
    import torch
    from fastai.callback.mixup import MixUp
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner)
    from fastai.callback.tracker import SaveModelCallback
    from fastai.data.transforms import Normalize
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
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
            seed=seed,
            device=torch.device("cpu"),
        )

    times: dict[str, float] = {}
    t = time.perf_counter()
    set_seed(seed, reproducible=True)
    small = loaders(r["presize"][0], r["size"][0])
    large = loaders(r["presize"][1], r["size"][1])
    classes = list(small.vocab)
    torch.manual_seed(seed)
    model, _ = create_model("tf_efficientnet_lite0", len(classes), "packaged")
    learn = Learner(
        small,
        model,
        loss_func=CrossEntropyLossFlat(),
        metrics=accuracy,
        splitter=param_groups,
        wd=r["wd"],
        path=work,
    )
    learn.freeze()
    times["data"] = time.perf_counter() - t + (t - t0)  # imports count here, as ours do

    t = time.perf_counter()
    with learn.no_logging():
        learn.lr_find(num_it=r["lr_find_iters"], show_plot=False)
    times["lr_find"] = time.perf_counter() - t

    def best() -> float:  # the kept epoch's accuracy (SaveModelCallback reloads it)
        return max(float(v[2]) for v in learn.recorder.values)

    def keep_best(stage: str):  # ours keeps each stage's best epoch (`monitor: accuracy`)
        return SaveModelCallback(monitor="accuracy", fname=f"best-{stage}", with_opt=False)

    with learn.no_logging(), learn.no_bar():
        t = time.perf_counter()
        learn.fit_one_cycle(r["epochs"][0], r["lr_frozen"], cbs=keep_best("frozen"))
        times["frozen"] = time.perf_counter() - t
        stage_acc = {"frozen": best()}
        learn.dls = large
        learn.unfreeze()
        t = time.perf_counter()
        learn.fit_one_cycle(r["epochs"][1], slice(*r["lr_unfrozen"]), cbs=keep_best("unfrozen"))
        times["unfrozen"] = time.perf_counter() - t
        stage_acc["unfrozen"] = best()
        t = time.perf_counter()
        mix = [MixUp(r["mixup"]), keep_best("mixup")]
        learn.fit_one_cycle(r["epochs"][2], slice(*r["lr_mixup"]), cbs=mix)
        times["mixup"] = time.perf_counter() - t
        stage_acc["mixup"] = best()

        t = time.perf_counter()
        plain = float(learn.validate()[1])
        preds, targs = learn.tta(n=r["tta_n"], beta=r["tta_beta"])
        with_tta = float((preds.argmax(1) == targs).float().mean())
        times["evaluate"] = time.perf_counter() - t
    return {"accuracy": plain, "tta_accuracy": with_tta, "times": times, "stages": stage_acc}


# ---- our arm -------------------------------------------------------------------------------------


def _params(seed: int, r: dict) -> dict:
    def stage(i: int, **extra) -> dict:
        train = {"epochs": r["epochs"][i], "size": r["size"][min(i, 1)], "seed": seed}
        loader = {"batch_size": r["batch_size"]}
        return {"train": {**train, "loader": loader, "wd": r["wd"], **extra}}

    return {
        "ingest": {"layout": "folder", "folder": {"valid_folder": "validation"}},
        "small": {"presize": {"size": r["presize"][0]}},
        "large": {"presize": {"size": r["presize"][1]}},
        "model": {"seed": seed},
        "runtime": {"accelerator": "cpu", "progress": False},
        "lr_find": {"num_it": r["lr_find_iters"]},
        "tta": {"n": r["tta_n"], "beta": r["tta_beta"], "seed": seed},
        "frozen": stage(0, lr=r["lr_frozen"]),
        "unfrozen": stage(1, lr=list(r["lr_unfrozen"])),
        "mixup": stage(2, lr=list(r["lr_mixup"]), mixup=r["mixup"]),
    }


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


def run_ours(data: Path, seed: int, r: dict, work: Path) -> dict:
    """``kedro run --pipeline=cassava``, as a user runs it, with this seed's parameters."""
    import pandas as pd
    import yaml

    root = work.parent / "ours-project"
    (root / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(_params(seed, r)))
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--pipelines=cassava"],
        cwd=root, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"kedro run --pipelines=cassava:\n{proc.stderr[-4000:]}")
    reports = root / "data" / "08_reporting"
    metrics = json.loads((reports / "metrics.json").read_text())
    # the training stages timed by the epochs' own clocks (training and validation)
    history = {s: pd.read_csv(reports / f"history_{s}.csv") for s in STAGES}
    times = {s: float(h["seconds"].sum()) for s, h in history.items()}
    return {
        "accuracy": metrics["plain"]["accuracy"],
        "tta_accuracy": metrics["with_tta"]["accuracy"],
        "times": times,
        "stages": {s: float(h["accuracy"].max()) for s, h in history.items()},
    }


def run_model_only(data: Path, seed: int, r: dict, work: Path) -> dict:
    """The floor: each stage's model work alone (the same steps and validation passes, on
    random tensors already in memory, channels-last as ours): no data, no bookkeeping."""
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
    times: dict[str, float] = {}
    for i, stage in enumerate(STAGES):
        size = r["size"][min(i, 1)]
        (freeze if i == 0 else unfreeze)(model)
        cfg = StageConfig(name=stage, epochs=r["epochs"][i], lr=1e-4, wd=r["wd"])
        opt = make_optimizer(model, [1e-4] * len(param_groups(model)), cfg)
        x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, n_classes, (bs,))
        valid_batches = [min(bs, n_valid - k) for k in range(0, n_valid, bs)]
        t = time.perf_counter()
        for _ in range(cfg.epochs):
            model.train()
            for _ in range(n_train // bs):  # drop_last, as both loaders
                F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            model.eval()
            with torch.no_grad():
                for b in valid_batches:
                    model(x[:b])
        times[stage] = time.perf_counter() - t
    return {"times": times}


# ---- driver --------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    r = json.loads(args.recipe)
    work = Path(args.work)
    run = {"fastai": run_fastai, "ours": run_ours, "model": run_model_only}[args.arm]
    t = time.perf_counter()
    out = run(Path(args.data), args.seed, r, work)
    out["total"] = time.perf_counter() - t
    print("\nRESULT " + json.dumps(out), flush=True)


def spawn(arm: str, data: Path, seed: int, r: dict, tmp: Path) -> dict:
    work = tmp / f"{arm}-{seed}"
    work.mkdir()
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", arm, "--seed", str(seed), "--data", str(data),
         "--work", str(work), "--recipe", json.dumps(r)],
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--presize-small", type=int, default=160)
    p.add_argument("--size-small", type=int, default=128)
    p.add_argument("--presize-large", type=int, default=192)
    p.add_argument("--size-large", type=int, default=160)
    p.add_argument("--epochs", type=int, nargs=3, default=[1, 1, 1])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-find-iters", type=int, default=100)
    p.add_argument(
        "--floor-only",
        action="store_true",
        help="only the model-only floor (each stage's model work on random tensors)",
    )
    p.add_argument("--child", choices=["fastai", "ours", "model"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.arm = args.child
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
    print(f"# recipe: {json.dumps(r)}, train limit {args.train_limit}")
    results: dict[str, list[dict]] = {"fastai": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(Path(tmp), args.train_limit)
        make_project(Path(tmp) / "ours-project", data)
        n_train = sum(1 for _ in (data / "train").rglob("*.jpg"))
        n_valid = sum(1 for _ in (data / "validation").rglob("*.jpg"))
        print(f"# clothing-small: {n_train} training and {n_valid} validation photos")
        floor = spawn("model", data, args.seeds[0], r, Path(tmp))["times"]
        print("model-only floor: " + " ".join(f"{k}={v:.1f}" for k, v in floor.items()), flush=True)
        if args.floor_only:
            return
        for i, seed in enumerate(args.seeds):
            order = ("fastai", "ours") if i % 2 == 0 else ("ours", "fastai")
            for arm in order:
                out = spawn(arm, data, seed, r, Path(tmp))
                results[arm].append(out)
                stages = " ".join(f"{k}={v:.1f}" for k, v in out["times"].items())
                print(f"{arm:6s} seed {seed}: accuracy {out['accuracy']:.4f} "
                      f"tta {out['tta_accuracy']:.4f} total {out['total']:.1f} s ({stages})",
                      flush=True)  # fmt: skip

    for arm in results.values():  # what is not a training stage: startup, data, lr_find, ...
        for out in arm:
            out["times"]["rest"] = out["total"] - sum(out["times"][k] for k in STAGES)
    print("\n| figure | fastai mean ± sd | ours mean ± sd |\n| --- | ---: | ---: |")
    summary = {}
    rows = [(k, lambda o, k=k: o[k]) for k in ("accuracy", "tta_accuracy")]
    rows += [(f"{k} stage accuracy", lambda o, k=k: o["stages"][k]) for k in STAGES]
    rows += [("total", lambda o: o["total"])]
    rows += [(f"{k} time", lambda o, k=k: o["times"][k]) for k in (*STAGES, "rest")]
    for key, get in rows:
        f = mean_sd([get(o) for o in results["fastai"]])
        o = mean_sd([get(x) for x in results["ours"]])
        summary[key] = (f, o)
        fmt = "{:.1f} ± {:.1f} s" if "time" in key or key == "total" else "{:.4f} ± {:.4f}"
        print(f"| {key} | {fmt.format(*f)} | {fmt.format(*o)} |")
    for arm, outs in results.items():
        for out in outs:
            rounded = {k: round(v, 1) for k, v in out["times"].items()}
            print(f"# {arm} times: {json.dumps(rounded)}")
    for k in STAGES:
        print(f"| model-only floor: {k} time | | {floor[k]:.1f} s |")
    (ft, _), (ot, _) = summary["total"]
    (rest, _) = summary["rest time"][1]
    print(f"\nfloor: with our data, augmentation and bookkeeping free, ours / fastai would be "
          f"{(sum(floor.values()) + rest) / ft:.3f}")  # fmt: skip
    (fa, fs), (oa, _) = summary["accuracy"]
    (fta, fts), (ota, _) = summary["tta_accuracy"]
    print(f"\naccuracy: ours {oa:.4f} vs fastai {fa:.4f} - {fs:.4f} = {fa - fs:.4f}: "
          f"{'met' if oa >= fa - fs else 'MISSED'}")  # fmt: skip
    print(f"tta accuracy: ours {ota:.4f} vs fastai {fta:.4f} - {fts:.4f} = {fta - fts:.4f}: "
          f"{'met' if ota >= fta - fts else 'MISSED'}")  # fmt: skip
    print(f"time: ours / fastai = {ot / ft:.3f} (target <= 0.6): "
          f"{'met' if ot <= 0.6 * ft else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
