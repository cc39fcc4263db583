"""The training loop: it learns, it resumes bit for bit, checkpoints are safe to load."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from cassava_pipeline.vision import provenance
from cassava_pipeline.vision.learner import (
    HISTORY_COLUMNS,
    RuntimeConfig,
    carried_state,
    cpu_copy,
    load_optimizer_state,
)
from cassava_pipeline.vision.run import lr_find_in_fabric, model_from_checkpoint, train_in_fabric
from cassava_pipeline.vision.schedule import LrFindOptions, OneCycle
from tests.images import REPO
from tests.training import (
    history_frame,
    initial_checkpoint,
    interrupted_fit,
    stage,
    tiny_shards,
)

CPU = RuntimeConfig(accelerator="cpu", progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """120 images, 30 of them for validation: enough for a threshold with margin."""
    return tiny_shards(tmp_path_factory.mktemp("learnable"), per_class=40)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_training_learns_and_keeps_the_best_epoch(learnable):
    result = train_in_fabric(initial_checkpoint(), learnable, stage(epochs=4), CPU)
    hist = pd.DataFrame(result.history)
    assert tuple(hist.columns) == HISTORY_COLUMNS
    # Chance is 1/3. Checked over 6 seeds (model and stage) with fastai's per-batch crops: the
    # best epoch scored 30/30 in five and 29/30 in one, so 27/30 leaves 2 images of margin for
    # float differences between CPUs.
    assert hist["accuracy"].max() >= 0.9
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert result.best_epoch == int(hist["accuracy"].idxmax())
    assert result.best_metric == hist["accuracy"].max()
    assert (hist["error_rate"] + hist["accuracy"]).round(9).eq(1).all()


def test_resume_after_interruption_equals_uninterrupted(shards, tmp_path: Path):
    full = train_in_fabric(
        initial_checkpoint(), shards, stage(), CPU, checkpoint_dir=tmp_path / "a"
    )
    # First run stops after one epoch, as an interrupted process would.
    interrupted_fit(shards, stage(), tmp_path / "b", epochs=1)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = train_in_fabric(
        initial_checkpoint(), shards, stage(), CPU, checkpoint_dir=tmp_path / "b"
    )
    assert_same_weights(full.state_dict, resumed.state_dict)
    pd.testing.assert_frame_equal(history_frame(full.history), history_frame(resumed.history))


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    # Ctrl-C's default, even where this process was started with SIGINT ignored (a parallel
    # test worker, nohup): Python then installs no KeyboardInterrupt handler of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {repo!r})
    from cassava_pipeline.vision.learner import RuntimeConfig, Trainer
    from cassava_pipeline.vision.run import make_fabric, model_from_checkpoint
    from cassava_pipeline.vision.shards import ShardedImages
    from tests.training import initial_checkpoint, stage
    shards = ShardedImages({shards!r})
    fabric = make_fabric(RuntimeConfig(accelerator="cpu", progress=False))
    model, stats = model_from_checkpoint(initial_checkpoint())
    train, valid = shards.split()
    def die(row):  # after the epoch's checkpoint is on disk
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.{sig})
    Trainer(fabric, model, stats, progress=False).fit(
        train, valid, stage(), checkpoint_dir=Path({ckpt!r}), on_epoch=die
    )
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])  # kill -9, kill, Ctrl-C
def test_killed_stage_resumes_to_the_same_weights(shards, tmp_path: Path, sig):
    full = train_in_fabric(initial_checkpoint(), shards, stage(), CPU)
    script = KILLER.format(
        repo=str(REPO), shards=str(shards.directory), ckpt=str(tmp_path), sig=sig
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True
    )
    if sig == "SIGINT":  # Python turns it into KeyboardInterrupt, then dies of the signal
        assert "KeyboardInterrupt" in proc.stderr and proc.returncode != 0
    else:
        assert proc.returncode == -getattr(signal, sig), proc.stderr[-2000:]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no torn temp file
    resumed = train_in_fabric(initial_checkpoint(), shards, stage(), CPU, checkpoint_dir=tmp_path)
    assert_same_weights(full.state_dict, resumed.state_dict)
    pd.testing.assert_frame_equal(history_frame(full.history), history_frame(resumed.history))


def test_same_seed_same_metrics_bit_for_bit(shards):
    a = train_in_fabric(initial_checkpoint(), shards, stage(epochs=2, mixup=0.4), CPU)
    b = train_in_fabric(initial_checkpoint(), shards, stage(epochs=2, mixup=0.4), CPU)
    pd.testing.assert_frame_equal(history_frame(a.history), history_frame(b.history))
    assert_same_weights(a.state_dict, b.state_dict)


def test_the_progress_bar_changes_no_number(shards, monkeypatch):
    """runtime.progress is a display setting: with a live bar (as in a terminal) the same seed
    gives the same weights and history, bit for bit, as without one."""
    import io

    from cassava_pipeline.vision import learner

    shown = io.StringIO()
    tqdm = learner.tqdm

    def live_bar(*args, **kwargs):  # tqdm.auto, drawing as it would on a TTY
        return tqdm(*args, **{**kwargs, "disable": False, "file": shown})

    monkeypatch.setattr(learner, "tqdm", live_bar)
    quiet = train_in_fabric(initial_checkpoint(), shards, stage(epochs=2, mixup=0.4), CPU)
    with_bar = train_in_fabric(
        initial_checkpoint(), shards, stage(epochs=2, mixup=0.4), replace(CPU, progress=True)
    )
    assert "frozen 0" in shown.getvalue() or "it/s" in shown.getvalue()  # the bar was drawn
    pd.testing.assert_frame_equal(history_frame(quiet.history), history_frame(with_bar.history))
    assert_same_weights(quiet.state_dict, with_bar.state_dict)


def test_monitor_last_keeps_the_last_epoch_as_fit_one_cycle(shards, tmp_path: Path):
    """monitor: last keeps the weights after the last epoch (fastai's fine_tune, no
    SaveModelCallback) and says which epoch that is; accuracy keeps its best epoch."""
    from cassava_pipeline.vision.integrity import load_checkpoint

    last = train_in_fabric(
        initial_checkpoint(), shards, stage(epochs=3, monitor="last"), CPU, checkpoint_dir=tmp_path
    )
    assert last.best_epoch == 2
    assert last.best_metric == last.history[-1]["accuracy"]
    after_last_epoch = load_checkpoint(tmp_path / "last.pt", todo="")["model"]
    assert_same_weights(last.state_dict, after_last_epoch)
    best = train_in_fabric(initial_checkpoint(), shards, stage(epochs=3), CPU)
    accuracies = [row["accuracy"] for row in best.history]
    assert best.best_epoch == accuracies.index(max(accuracies))  # the first of the best
    pd.testing.assert_frame_equal(history_frame(best.history), history_frame(last.history))


def test_frozen_stage_leaves_the_body_convolutions_alone(shards):
    start = initial_checkpoint()
    result = train_in_fabric(start, shards, stage(epochs=1, freeze=True, lr=1e-2), CPU)
    assert torch.equal(result.state_dict["0.0.weight"], start["model"]["0.0.weight"])  # conv1
    assert not torch.equal(result.state_dict["0.1.weight"], start["model"]["0.1.weight"])  # bn1
    assert not torch.equal(result.state_dict["1.8.weight"], start["model"]["1.8.weight"])  # head


def test_lr_find_sweeps_suggests_and_leaves_the_weights_as_they_were(shards):
    from cassava_pipeline.vision.learner import Trainer
    from cassava_pipeline.vision.run import make_fabric
    from cassava_pipeline.vision.schedule import suggest_valley

    start = initial_checkpoint()
    model, stats = model_from_checkpoint(start)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(make_fabric(CPU), model, stats, progress=False)
    train, _ = shards.split()
    result = trainer.lr_find(train, stage(), LrFindOptions(num_it=30))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert len(result["lrs"]) == len(result["losses"]) <= 30
    assert result["lrs"][0] == pytest.approx(1e-7)
    assert result["suggestion"] == suggest_valley(result["lrs"], result["losses"], 30)
    # through Fabric as the node runs it: the same sweep, to the bit
    again = lr_find_in_fabric(start, shards, stage(), LrFindOptions(num_it=30), CPU)
    assert again["losses"] == result["losses"] and again["suggestion"] == result["suggestion"]


def test_lr_find_is_cached_while_its_inputs_hold(shards, tmp_path: Path, caplog, monkeypatch):
    from cassava_pipeline.vision.learner import Trainer

    caplog.set_level("INFO", logger="cassava_pipeline")
    options = LrFindOptions(num_it=20)
    first = lr_find_in_fabric(
        initial_checkpoint(), shards, stage(), options, CPU, cache_dir=tmp_path
    )
    assert (tmp_path / "lr_find.json").is_file()
    caplog.clear()

    def no_sweep(*args, **kwargs):
        raise AssertionError("swept again although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "sweep", no_sweep)
        again = lr_find_in_fabric(
            initial_checkpoint(), shards, stage(), options, CPU, cache_dir=tmp_path
        )
        # what the sweep does not read (SWEEP_UNUSED) changes nothing: reused
        unread = stage(
            epochs=7, monitor="valid_loss", mixup=0.4, grad_accum=2, one_cycle=OneCycle(div=5)
        )
        reused = lr_find_in_fabric(
            initial_checkpoint(), shards, unread, options, CPU, cache_dir=tmp_path
        )
    assert again == first == reused and "holds this sweep (same inputs)" in caplog.text
    assert " steps in " not in caplog.text
    caplog.clear()
    read = lr_find_in_fabric(initial_checkpoint(), shards, stage(wd=0.1), options, CPU)
    assert read["losses"] != first["losses"]  # wd is read: a different sweep
    assert re.search(
        r"lr_find: 20 steps in \d+\.\d s, suggested lr .*frozen\.train\.lr=", caplog.text
    )
    caplog.clear()
    other = lr_find_in_fabric(
        initial_checkpoint(seed=1), shards, stage(), options, CPU, cache_dir=tmp_path
    )
    assert "started from other weights" in caplog.text and "sweeping again" in caplog.text
    assert other["losses"] != first["losses"]
    # a damaged cache file is never used: it is said so, and the sweep runs again
    caplog.clear()
    path = tmp_path / "lr_find.json"
    path.write_text(path.read_text().replace('"suggestion": ', '"suggestion": 1', 1))
    fresh = lr_find_in_fabric(
        initial_checkpoint(seed=1), shards, stage(), options, CPU, cache_dir=tmp_path
    )
    assert "damaged" in caplog.text and fresh == other


def test_gradient_accumulation_steps_the_optimizer_every_k_batches(shards, tmp_path: Path):
    # 27 training images, batch 6: 4 batches per epoch; with grad_accum 2, 2 optimizer steps.
    train_in_fabric(
        initial_checkpoint(), shards, stage(epochs=1, grad_accum=2), CPU, checkpoint_dir=tmp_path
    )
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["scheduler"]["total_steps"] == 2
    assert saved["scheduler"]["last_epoch"] == 2
    steps = {s["step"].item() for s in saved["optimizer"]["state"].values()}
    assert steps == {2.0}


def test_finished_stage_is_reused_only_while_every_input_is_equal(
    shards, tmp_path: Path, caplog, monkeypatch
):
    """Reused when nothing changed; otherwise one log line names the input, and the stage trains
    from the start to exactly what a run without any resume folder gives."""
    first = train_in_fabric(
        initial_checkpoint(), shards, stage(epochs=1), CPU, checkpoint_dir=tmp_path / "base"
    )
    caplog.set_level("INFO", logger="cassava_pipeline")
    again = train_in_fabric(
        initial_checkpoint(), shards, stage(epochs=1), CPU, checkpoint_dir=tmp_path / "base"
    )
    assert "finished; reusing it" in caplog.text
    assert_same_weights(first.state_dict, again.state_dict)
    assert again.history == first.history  # not retrained: even the timings are the stored ones
    assert again.trained_on == shards.content

    resplit = tiny_shards(tmp_path / "resplit", split_seed=1)  # same images, other split
    larger = tiny_shards(tmp_path / "larger", presize=44)
    changes = {  # name -> (start, shards, stage, runtime, expected log)
        "weights": (
            initial_checkpoint(seed=1),
            shards,
            stage(epochs=1),
            CPU,
            "started from other weights (an earlier stage or the model changed)",
        ),
        "settings": (
            initial_checkpoint(),
            shards,
            stage(epochs=1, wd=0.05),
            CPU,
            "was trained with other stage settings (wd 0.01 -> 0.05)",
        ),
        "lr": (
            initial_checkpoint(),
            shards,
            stage(epochs=1, lr=(1e-4, 2e-2)),
            CPU,
            "was trained at another learning rate ([0.0001, 0.01] -> [0.0001, 0.02])",
        ),
        "split": (
            initial_checkpoint(),
            resplit,
            stage(epochs=1),
            CPU,
            "was trained on other shards (split changed)",
        ),
        "presize": (
            initial_checkpoint(),
            larger,
            stage(epochs=1),
            CPU,
            "was trained on other shards (presize changed, pixels changed)",
        ),
        "precision": (
            initial_checkpoint(),
            shards,
            stage(epochs=1),
            replace(CPU, precision="bf16-mixed"),
            "was trained at another precision (32-true -> bf16-mixed)",
        ),
        "code": (
            initial_checkpoint(),
            shards,
            stage(epochs=1),
            CPU,
            "was trained by other code (augment.py changed)",
        ),
    }
    for name, (start, data, cfg, runtime, expected) in changes.items():
        work = tmp_path / name
        shutil.copytree(tmp_path / "base", work)
        caplog.clear()
        with monkeypatch.context() as m:
            if name == "code":  # one edited line in the augmentation code
                edited = {**provenance.code_digests(), "augment.py": "0" * 32}
                m.setattr(provenance, "code_digests", lambda edited=edited: edited)
            result = train_in_fabric(start, data, cfg, runtime, checkpoint_dir=work)
            fresh = train_in_fabric(start, data, cfg, runtime)  # no resume folder at all
        line = f"test: {work / 'last.pt'} {expected}; training from the start"
        assert line in caplog.text, (name, caplog.text[-2000:])
        assert "reusing" not in caplog.text and "resuming" not in caplog.text, name
        assert_same_weights(result.state_dict, fresh.state_dict)
        assert result.trained_on == data.content
        # the resume file now records the new inputs: the next run reuses it
        caplog.clear()
        with monkeypatch.context() as m:
            if name == "code":
                m.setattr(provenance, "code_digests", lambda edited=edited: edited)
            train_in_fabric(start, data, cfg, runtime, checkpoint_dir=work)
        assert "finished; reusing it" in caplog.text, name

    # switching back: the first run, kept when the settings changed, is put back and reused
    work = tmp_path / "settings"
    (kept_before,) = (work / "kept").iterdir()  # the base run, kept when wd became 0.05
    caplog.clear()
    back = train_in_fabric(initial_checkpoint(), shards, stage(epochs=1), CPU, checkpoint_dir=work)
    assert f"{kept_before} held a run from these same inputs" in caplog.text, caplog.text
    assert "finished; reusing it" in caplog.text and "training from the start" not in caplog.text
    assert_same_weights(back.state_dict, first.state_dict)
    assert back.history == first.history  # the very run, timings included
    (kept_after,) = (work / "kept").iterdir()  # now the wd 0.05 run waits there
    assert kept_after != kept_before and sorted(p.name for p in work.iterdir()) == [
        "kept",
        "last.pt",
    ]


def test_stages_draw_different_random_streams(shards, monkeypatch):
    """Same seed, other stage name: another order, other crops, other augmentations."""
    from cassava_pipeline.vision import learner

    seen: dict[str, torch.Tensor] = {}
    real = learner._model_input

    def record(augment, images, cfg, *, train, generator=None):
        x = real(augment, images, cfg, train=train, generator=generator)
        if train:
            seen.setdefault(cfg.name, x.detach().clone())
        return x

    monkeypatch.setattr(learner, "_model_input", record)
    for name in ("unfrozen", "mixup"):
        train_in_fabric(initial_checkpoint(), shards, stage(epochs=1, name=name), CPU)
    first_unfrozen = seen.pop("unfrozen")
    assert first_unfrozen.shape == seen["mixup"].shape
    assert not torch.equal(first_unfrozen, seen["mixup"])
    # and the same stage name replays its own stream exactly
    seen.clear()
    train_in_fabric(initial_checkpoint(), shards, stage(epochs=1, name="unfrozen"), CPU)
    assert torch.equal(first_unfrozen, seen["unfrozen"])


def _steps(state: dict) -> set[float]:
    return {float(s["step"]) for s in state["state"].values()}


def test_adamw_state_goes_on_from_the_previous_stage_as_fastais_learner(
    shards, tmp_path: Path, caplog
):
    """fastai keeps one optimizer across ``fit_one_cycle`` calls and clears its state only on
    freeze/unfreeze: a next stage with the same ``freeze`` goes on from the state (moving
    averages and step counts); ``optimizer_state: reset``, or another ``freeze``, starts fresh."""
    first = train_in_fabric(initial_checkpoint(), shards, stage(epochs=1), CPU)
    assert _steps(first.optimizer_state) == {4.0}  # 27 images, batch 6: 4 steps
    start = {
        **initial_checkpoint(),
        "model": first.state_dict,
        "optimizer": {"freeze": False, "state": first.optimizer_state},
    }
    caplog.set_level("INFO", logger="cassava_pipeline")
    carried = train_in_fabric(start, shards, stage(epochs=1, name="next"), CPU)
    assert "next: AdamW goes on from the previous stage's state" in caplog.text
    assert _steps(carried.optimizer_state) == {8.0}  # the count goes on: 4 + 4
    caplog.clear()
    reset = train_in_fabric(
        start, shards, stage(epochs=1, name="next", optimizer_state="reset"), CPU
    )
    assert _steps(reset.optimizer_state) == {4.0}
    assert "goes on from" not in caplog.text
    frozen = train_in_fabric(start, shards, stage(epochs=1, name="next", freeze=True), CPU)
    assert _steps(frozen.optimizer_state) == {4.0}  # fastai's freeze() clears the state
    # the carried moving averages change the steps: other weights than a fresh AdamW gives
    differ = [
        k for k in carried.state_dict if not torch.equal(carried.state_dict[k], reset.state_dict[k])
    ]
    assert differ
    # no state: fresh, as for the first stage
    fresh = train_in_fabric({**start, "optimizer": None}, shards, stage(epochs=1, name="next"), CPU)
    assert_same_weights(fresh.state_dict, reset.state_dict)

    # a finished stage kept in a resume folder is not reused when the state it started from
    # differs: its fingerprint records the carried state's digest
    train_in_fabric(start, shards, stage(epochs=1, name="next"), CPU, checkpoint_dir=tmp_path)
    caplog.clear()
    again = train_in_fabric(
        {**start, "optimizer": None}, shards, stage(epochs=1, name="next"), CPU,
        checkpoint_dir=tmp_path,
    )  # fmt: skip
    assert "started from another optimizer state" in caplog.text
    assert_same_weights(again.state_dict, reset.state_dict)


def test_carried_adamw_state_is_loaded_exactly_with_this_stages_hyperparameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = stage(epochs=1)
    before = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    model(torch.randn(5, 4)).sum().backward()
    before.step()
    saved = cpu_copy(before.state_dict())
    after = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    state = carried_state({"freeze": False, "state": saved}, cfg, after)
    load_optimizer_state(after, state)
    for p in model.parameters():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(after.state[p][k], before.state[p][k])
    assert after.param_groups[0]["lr"] == 3e-4 and after.param_groups[0]["weight_decay"] == 0.1
    # its own copies: under ddp_spawn the carried tensors are one shared block for every process
    for p in model.parameters():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            loaded = after.state[p][k]
            assert all(loaded.data_ptr() != t[k].data_ptr() for t in saved["state"].values())
    # a state for other shapes is not loaded (reported, fresh AdamW)
    other = torch.optim.AdamW(torch.nn.Linear(4, 5).parameters())
    assert carried_state({"freeze": False, "state": saved}, cfg, other) is None
    assert carried_state({"freeze": True, "state": saved}, cfg, after) is None
    with pytest.raises(ValueError, match="optimizer_state is 'keep': Input should be 'fastai'"):
        stage(epochs=1, optimizer_state="keep")
