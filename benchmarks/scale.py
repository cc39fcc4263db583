"""Kaggle scale on this box: the data half, DVC and the loader at 21,397 images (issue 17).

    .venv/bin/python benchmarks/scale.py [--n 21397] [--work data/scale] [--skip-dvc]

A stand-in of the real competition set's shape (21,397 JPEGs at 800x600 in Kaggle's layout and
class mix, drawn by the sample generator on all cores) is made once under ``--work`` (git-ignored
``data/scale/`` by default) and reused while its marker file says it was drawn with the same
options. The work folder holds a copy of this project (``project/``: its own git and DVC repo,
whose ``conf/scale`` is ``conf/kaggle`` with the training parts left out), so nothing here
touches the checkout's own data, MLflow store or DVC cache. Then, each timed, with the peak
resident memory of the process tree (parent and workers) and the disk used:

1. ``kedro run --pipelines=data --env=scale``: ingest (every file verified), split, presize at
   460 and 560 in the encoding conf/kaggle uses; the same run on the first 2,000 images, in a
   project of its own, is the memory baseline;
2. ``dvc add`` of the raw folder, ``dvc commit`` of the stages already run (hashing the shards),
   ``dvc repro data`` with nothing changed, ``dvc push`` to a local-folder remote and
   ``dvc pull`` into a fresh clone (time, bytes);
3. one pass of the training loader at the seed's sizes (224 from 460, 448 from 560): the
   DataLoader alone (read, decode, crop, collate) at 0, 1 and 2 workers, and with the batch
   augmentation (which runs on the GPU in a GPU run, here on the CPU): images/s, per core;
4. the rerun of step 1 with nothing changed: how long until it knows there is nothing to do.

Each figure is printed as RESULTS.md records it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_KAGGLE = 21_397
RAW = Path("data/01_raw/cassava-leaf-disease-classification")  # conf/kaggle's raw_images


# ---- the stand-in data set ------------------------------------------------------------------


def _save_chunk(args: tuple) -> int:
    """Draw and save a chunk of images (a pool task): returns the bytes written."""
    import numpy as np

    from cassava_pipeline.vision.sample import draw_image

    root, items, options = args
    total = 0
    for index, image_id, label in items:
        image = draw_image(label, np.random.default_rng([options.seed, 1, index]), options)
        path = Path(root) / image_id
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="JPEG", quality=90)  # as the sample_images dataset saves
        tmp.rename(path)
        total += path.stat().st_size
    return total


def make_stand_in(raw: Path, n: int, seed: int = 2020) -> dict:
    """Kaggle's layout (train.csv, label map, train_images/) with ``n`` images; reused when its
    marker says it was drawn with the same options and every listed file is there."""
    from cassava_pipeline.vision.parallel import chunked, ordered_map, resolve_workers
    from cassava_pipeline.vision.sample import SampleOptions, label_map, sample_table

    options = SampleOptions(n_images=n, seed=seed)
    marker = raw / ".stand-in.json"
    want = {"n_images": n, "seed": seed, "width": options.width, "height": options.height}
    table = sample_table(options)
    images = raw / "train_images"
    same = marker.exists() and json.loads(marker.read_text()) == want
    if same and all((images / i).exists() for i in table["image_id"]):
        return {"drawn": False, "seconds": 0.0}
    images.mkdir(parents=True, exist_ok=True)
    todo = [
        (i, image_id, int(label))
        for i, (image_id, label) in enumerate(zip(table["image_id"], table["label"], strict=True))
        if not (images / image_id).exists()
    ]
    t0 = time.perf_counter()
    tasks = [(str(images), c, options) for c in chunked(todo, 16)]
    done = 0
    for written in ordered_map(_save_chunk, tasks, workers=resolve_workers(0)):
        done += written
    table.to_csv(raw / "train.csv", index=False)
    (raw / "label_num_to_disease_map.json").write_text(json.dumps(label_map(), indent=2))
    marker.write_text(json.dumps(want))
    return {"drawn": True, "seconds": time.perf_counter() - t0, "images": len(todo)}


# ---- measuring a process tree ------------------------------------------------------------------


def _tree_rss(pid: int) -> tuple[int, int]:
    """(resident bytes of ``pid``, of its descendants), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid, pages = int(fields[1]), int(fields[21])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    below, stack = 0, list(children.get(pid, []))
    while stack:
        p = stack.pop()
        below += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return rss.get(pid, 0), below


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; wall time and peak resident memory of the process tree, sampled every 50 ms
    (the parent alone, its descendants together, and the whole tree at one moment)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = {"parent": 0, "workers": 0, "tree": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            parent, workers = _tree_rss(proc.pid)
            peak["parent"] = max(peak["parent"], parent)
            peak["workers"] = max(peak["workers"], workers)
            peak["tree"] = max(peak["tree"], parent + workers)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}")
    return {"seconds": seconds, "peak_mb": {k: v / 2**20 for k, v in peak.items()}, "log": out}


def du(path: Path) -> int:
    """Bytes of the files under ``path`` (a hard link counted once)."""
    seen, total = set(), 0
    for p in [path] if path.is_file() else path.rglob("*"):
        st = p.lstat()
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


# ---- the projects ------------------------------------------------------------------------------


def make_project(root: Path) -> Path:
    """A copy of this project at ``root`` (code, conf, dvc.yaml refreshed; data kept) whose
    ``conf/scale`` is ``conf/kaggle`` with its own MLflow experiment, and whose dvc.yaml points
    at that environment and at Kaggle's raw folder."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", ".gitignore", ".dvcignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, root / name)
    for name in ("src", "conf"):
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for f in (root / "conf" / "local").iterdir():
        if f.name != ".gitkeep":
            f.unlink()
    scale = root / "conf" / "scale"
    shutil.copytree(root / "conf" / "kaggle", scale)
    mlflow = yaml.safe_load((scale / "mlflow.yml").read_text())
    mlflow["tracking"]["experiment"]["name"] = "cassava_pipeline_scale"
    (scale / "mlflow.yml").write_text(yaml.safe_dump(mlflow))
    text = (REPO / "dvc.yaml").read_text()
    for old, new in [
        ("- env: local", "- env: scale"),
        ("raw: data/01_raw/cassava_sample", f"raw: {RAW.as_posix()}"),
        ('sub: ""', "sub: scale/"),
    ]:
        assert old in text, old
        text = text.replace(old, new, 1)
    (root / "dvc.yaml").write_text(text)
    return root


def subset_project(root: Path, full_raw: Path, n: int) -> Path:
    """A project like ``make_project``'s whose raw folder holds the first ``n`` images of
    ``full_raw`` (hard links: no copy)."""
    import pandas as pd

    make_project(root)
    raw = root / RAW
    images = raw / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(full_raw / "train.csv").head(n)
    for image_id in table["image_id"]:
        if not (images / image_id).exists():
            os.link(full_raw / "train_images" / image_id, images / image_id)
    table.to_csv(raw / "train.csv", index=False)
    shutil.copy(full_raw / "label_num_to_disease_map.json", raw)
    return root


OUTPUTS = ("data/02_intermediate", "data/03_primary", "data/05_model_input", "data/08_reporting")


def clean_outputs(root: Path) -> None:
    for layer in OUTPUTS:
        shutil.rmtree(root / layer / "scale", ignore_errors=True)


KEDRO_ENV = {"KEDRO_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg"}


def kedro_data(root: Path) -> dict:
    out = timed(
        [sys.executable, "-m", "kedro", "run", "--pipelines=data", "--env=scale"],
        root,
        KEDRO_ENV,
    )
    out["node_times"] = next(
        (line.split("node times: ", 1)[1] for line in out["log"].splitlines()
         if "node times: " in line),
        "",
    )  # fmt: skip
    out["reused"] = [line.split("presize ", 1)[1].split(":")[0] for line in out["log"].splitlines()
                     if "kept as it is" in line]  # fmt: skip
    return out


def shard_bytes(root: Path) -> dict[str, int]:
    base = root / "data" / "05_model_input" / "scale"
    return {d.name: du(d) for d in sorted(base.iterdir())} if base.exists() else {}


# ---- DVC -------------------------------------------------------------------------------------


def dvc(root: Path, *args: str) -> dict:
    # the stages' commands (python, kedro) from this interpreter's environment, as after
    # `source .venv/bin/activate`
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return timed([sys.executable, "-m", "dvc", *args], root, {**KEDRO_ENV, "PATH": path})


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=scale", "-c", "user.email=scale@example.invalid", *args],
        cwd=root, check=True, capture_output=True,
    )  # fmt: skip


def dvc_steps(root: Path, work: Path) -> dict:
    """dvc add of the raw images, dvc commit of the stages Kedro already ran, dvc repro with
    nothing changed, dvc push to a local folder and dvc pull into a fresh clone."""
    for d in (root / ".git", root / ".dvc", work / "remote", work / "clone"):
        shutil.rmtree(d, ignore_errors=True)
    for f in root.glob("**/*.dvc"):
        f.unlink()
    (root / "dvc.lock").unlink(missing_ok=True)
    git(root, "init", "-q")
    res: dict = {}
    dvc(root, "init", "-q")
    # Links instead of copies: 21k images and ~4 GB of shards are not duplicated into the cache
    # (README, "DVC at Kaggle's size"); Kedro replaces outputs by renaming, never in place.
    dvc(root, "config", "cache.type", "hardlink,symlink")
    dvc(root, "remote", "add", "-d", "local", str(work / "remote"))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    res["add"] = dvc(root, "add", RAW.as_posix())
    res["repro_params"] = dvc(root, "repro", "params")
    res["commit"] = dvc(root, "commit", "-f", "data")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "data")
    res["repro"] = dvc(root, "repro", "data")
    res["status"] = dvc(root, "status", "data")
    res["push"] = dvc(root, "push")
    res["remote_bytes"] = du(work / "remote")
    res["cache_bytes"] = du(root / ".dvc" / "cache")
    subprocess.run(["git", "clone", "-q", str(root), str(work / "clone")], check=True)
    dvc(work / "clone", "config", "--local", "cache.type", "hardlink,symlink")
    res["pull"] = dvc(work / "clone", "pull", "--with-deps", "data")  # what the data stage needs
    res["pulled_bytes"] = du(work / "clone" / "data")
    return res


# ---- the loader ------------------------------------------------------------------------------


def loader_rate(
    shards, size: int, batch_size: int, workers: int, augment: bool, limit: int | None
) -> dict:
    """Images/s our training loader delivers from ``shards`` (read, decode, random crop,
    collate), with ``BatchAugment``'s resample to ``size`` when ``augment``: loader.py's pass."""
    from loader import ours

    seconds, n = ours(shards, size, batch_size, workers, augment=augment, limit=limit)
    return {"images": n, "seconds": seconds, "per_s": n / seconds}


def loader_steps(root: Path, small_root: Path, probe: int) -> dict:
    """Per stage: the worker count that delivers most (a probe of ``probe`` images at 0, 1, 2
    workers), then one whole pass at that count with and without the augmentation; and the
    same probe on raw shards of the 2,000-image project (written here once)."""
    import dataclasses

    import pandas as pd

    from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions, write_shards
    from cassava_pipeline.vision.shards import ShardedImages, stale_reason

    stages = {"frozen": ("presized_small", 224, 64), "unfrozen": ("presized_large", 448, 32)}
    cores = os.cpu_count() or 1
    out: dict = {}
    for stage, (folder, size, bs) in stages.items():
        shards = ShardedImages(root / "data" / "05_model_input" / "scale" / folder)
        probes = {w: loader_rate(shards, size, bs, w, False, probe) for w in range(cores + 1)}
        best = max(probes, key=lambda w: probes[w]["per_s"])
        whole = loader_rate(shards, size, bs, best, False, None)
        augmented = loader_rate(shards, size, bs, best, True, None)
        # raw shards of the first 2,000 images, at the same presize
        jpeg_small = ShardedImages(small_root / "data" / "05_model_input" / "scale" / folder)
        raw_dir = small_root / "data" / "raw-shards" / folder
        manifest = pd.read_parquet(small_root / "data" / "03_primary" / "scale" /
                                   "split_manifest.parquet")  # fmt: skip
        job = PresizeJob(
            str(small_root / RAW),
            manifest,
            tuple(jpeg_small.classes),
            dataclasses.replace(PresizeOptions(), size=shards.size, encoding="raw"),
        )
        if stale_reason(raw_dir, job) is not None:
            shutil.rmtree(raw_dir, ignore_errors=True)
            write_shards(job, raw_dir)
        raw = ShardedImages(raw_dir)
        raw_probes = {w: loader_rate(raw, size, bs, w, False, probe) for w in range(cores + 1)}
        raw_best = max(raw_probes, key=lambda w: raw_probes[w]["per_s"])
        out[stage] = {
            "presize": shards.size,
            "size": size,
            "batch_size": bs,
            "probe": {w: round(p["per_s"], 1) for w, p in probes.items()},
            "workers": best,
            "pass": whole,
            "pass_augmented": augmented,
            "raw_probe": {w: round(p["per_s"], 1) for w, p in raw_probes.items()},
            "raw_workers": raw_best,
            "jpeg_bytes_per_image": du(shards.directory) / len(shards),
            "raw_bytes_per_image": du(raw_dir) / len(raw),
        }
    return out


def per_core(rate: float, workers: int) -> float:
    """Images/s per core: the workers' cores (the main process's when it loads alone)."""
    return rate / max(1, workers)


# ---- report ----------------------------------------------------------------------------------

# One H100's ResNet-50 training throughput, mixed precision, at 224 (none lent to measure it):
# NVIDIA's DeepLearningExamples, PyTorch ResNet50 v1.5 README, "Training performance: NVIDIA
# DGX A100 (8x A100 80GB)": 2,470 img/s on one A100 80GB (mixed precision), times 1.8 for H100
# over A100 on ResNet-50 in MLPerf Training v3.0 (Dell, 16x H100-SXM5-80GB 7.8 min against
# 16x A100-SXM-80GB 14.4 min). At 448 the network does 4x the work per image.
A100_224 = 2470.0
H100_OVER_A100 = 1.8
H100_RATE = {224: A100_224 * H100_OVER_A100, 448: A100_224 * H100_OVER_A100 / 4}


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    import platform

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=N_KAGGLE, help="images in the stand-in set")
    ap.add_argument("--baseline", type=int, default=2000, help="images in the memory baseline")
    ap.add_argument("--work", type=Path, default=REPO / "data" / "scale")
    ap.add_argument("--probe", type=int, default=1024, help="images per worker-count probe")
    ap.add_argument("--skip-data", action="store_true", help="use the data half's outputs")
    ap.add_argument("--skip-dvc", action="store_true")
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--only-draw", action="store_true")
    args = ap.parse_args()
    work = args.work.resolve()
    root = work / "project"
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print(f"# {' '.join(sys.argv)}")
    make_project(root)
    drawn = make_stand_in(root / RAW, args.n)
    raw_bytes = du(root / RAW)
    print(
        f"stand-in: {args.n} images at 800x600, {mb(raw_bytes)}; "
        + (f"drawn in {drawn['seconds']:.0f} s" if drawn["drawn"] else "reused"),
        flush=True,
    )
    if args.only_draw:
        return

    small = subset_project(work / f"project-{args.baseline}", root / RAW, args.baseline)
    if not args.skip_data:
        data_steps(args, root, small)
    if not args.skip_dvc:
        dvc_report(dvc_steps(root, work))
    if not args.skip_loader:
        loader_report(loader_steps(root, small, args.probe), args.n)


def data_steps(args: argparse.Namespace, root: Path, small: Path) -> None:
    clean_outputs(small)
    base = kedro_data(small)
    print(
        f"data half, {args.baseline} images: {base['seconds']:.1f} s, peak resident "
        f"{base['peak_mb']['tree']:.0f} MiB (parent {base['peak_mb']['parent']:.0f}, workers "
        f"{base['peak_mb']['workers']:.0f}); nodes: {base['node_times']}",
        flush=True,
    )

    clean_outputs(root)
    first = kedro_data(root)
    shards = shard_bytes(root)
    print(
        f"data half, {args.n} images: {first['seconds']:.1f} s, peak resident "
        f"{first['peak_mb']['tree']:.0f} MiB (parent {first['peak_mb']['parent']:.0f}, workers "
        f"{first['peak_mb']['workers']:.0f}); nodes: {first['node_times']}",
        flush=True,
    )
    print("  shards: " + ", ".join(f"{k} {mb(v)}" for k, v in shards.items()))
    print(
        f"  memory, {args.n} over {args.baseline} images: "
        f"{first['peak_mb']['tree'] / base['peak_mb']['tree']:.3f} (target <= 1.1)"
    )
    print(f"  target: within 600 s: {'met' if first['seconds'] <= 600 else 'MISSED'}")

    again = kedro_data(root)
    print(
        f"rerun, nothing changed: {again['seconds']:.1f} s (target <= 30 s: "
        f"{'met' if again['seconds'] <= 30 else 'MISSED'}); reused presizes: {again['reused']}; "
        f"nodes: {again['node_times']}",
        flush=True,
    )


def dvc_report(d: dict) -> None:
    print(f"dvc add of the raw folder: {d['add']['seconds']:.1f} s")
    print(f"dvc commit -f data (hashes the outputs Kedro wrote): {d['commit']['seconds']:.1f} s")
    print(
        f"dvc repro data, nothing changed: {d['repro']['seconds']:.1f} s (target <= 30 s: "
        f"{'met' if d['repro']['seconds'] <= 30 else 'MISSED'})"
    )
    print(f"  {d['repro']['log'].strip().splitlines()[-1] if d['repro']['log'].strip() else ''}")
    print(f"dvc status data: {d['status']['seconds']:.1f} s")
    print(f"dvc push to a local folder: {d['push']['seconds']:.1f} s, {mb(d['remote_bytes'])}")
    print(f"dvc pull into a fresh clone: {d['pull']['seconds']:.1f} s, {mb(d['pulled_bytes'])}",
          flush=True)  # fmt: skip


def loader_report(loads: dict, n: int) -> None:
    print("loader (images/s; per core = over the workers' cores, or the main process's):")
    for stage, r in loads.items():
        w, rw = r["workers"], r["raw_workers"]
        jpeg_core = per_core(r["pass"]["per_s"], w)
        raw_core = per_core(r["raw_probe"][rw], rw)
        need = H100_RATE[r["size"]]
        print(
            f"  {stage}: {r['size']} from {r['presize']}, batch {r['batch_size']}: jpeg "
            f"probe {r['probe']}, one pass at {w} workers {r['pass']['per_s']:.0f}/s "
            f"({r['pass']['images']} images, {r['pass']['seconds']:.1f} s), with the "
            f"augmentation on the CPU {r['pass_augmented']['per_s']:.0f}/s; raw probe "
            f"{r['raw_probe']}"
        )
        print(
            f"    shards for {n} images: jpeg {mb(r['jpeg_bytes_per_image'] * n)}, raw "
            f"{mb(r['raw_bytes_per_image'] * n)}"
        )
        print(
            f"    per core: jpeg {jpeg_core:.0f}/s, raw {raw_core:.0f}/s; one H100 "
            f"consumes ~{need:.0f}/s: cores to keep it busy: jpeg {need / jpeg_core:.1f}, "
            f"raw {need / raw_core:.1f}; 1/16 of the H100 is {need / 16:.0f}/s per core "
            f"(jpeg {'met' if jpeg_core >= need / 16 else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
