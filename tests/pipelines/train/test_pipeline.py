"""The whole cassava pipeline (data and training) with a SequentialRunner, at test size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.runner import SequentialRunner
from PIL import Image

from cassava_pipeline.pipeline_registry import register_pipelines
from cassava_pipeline.pipelines.train.pipeline import STAGES
from cassava_pipeline.vision.learner import HISTORY_COLUMNS
from tests.pipelines.conftest import PLOTS, make_catalog, shrink_training


def test_pipeline_shape():
    pipe = register_pipelines()["cassava"]
    names = {n.name for n in pipe.nodes}
    assert {
        "frozen.train_stage",
        "unfrozen.train_stage",
        "mixup.train_stage",
        "lr_find",
        "evaluate",
        "export_model",
    } <= names
    assert [n.name for n in register_pipelines()["cassava_predict"].nodes] == ["predict_images"]
    # one node function reused by the three stages
    funcs = {n.func for n in pipe.nodes if n.name.endswith("train_stage")}
    assert len(funcs) == 1
    assert register_pipelines()["__default__"].nodes == pipe.nodes
    assert STAGES["unfrozen"] == ("large.presized_images", "frozen.checkpoint")


@pytest.mark.slow
def test_cassava_pipeline_end_to_end(kaggle_dir: Path, params, tmp_path: Path):
    params = shrink_training(params)
    params["frozen"]["train"]["validate_before"] = True  # the untrained head's accuracy
    catalog = make_catalog(
        kaggle_dir, params, tmp_path / "out", predict_folder=kaggle_dir / "train_images"
    )
    SequentialRunner().run(register_pipelines()["cassava"], catalog)

    lr = catalog["lr_find_result"].load()
    assert 1e-7 <= lr["suggestion"] <= 10 and len(lr["losses"]) <= 12
    previous = catalog["initial_checkpoint"].load()
    assert previous["classes"] == ["alpha", "beta", "gamma"] and previous["mean"] == [0.5] * 3
    for stage in ("frozen", "unfrozen", "mixup"):
        ckpt = catalog[f"{stage}.checkpoint"].load()
        assert ckpt["stage"] == stage and ckpt["arch"] == "tf_efficientnet_lite0"
        assert ckpt["image_size"] == 32 and ckpt["best_epoch"] == 0
        if stage == "frozen":  # validate_before: the starting point, before any step
            assert 0 <= ckpt["start_metrics"]["accuracy"] <= 1
            assert ckpt["start_metrics"]["valid_loss"] > 0
        else:  # fastai's default: no validation pass before the first epoch
            assert ckpt["start_metrics"] == {}
        hist = catalog[f"{stage}.history"].load()
        assert isinstance(hist, pd.DataFrame)
        assert tuple(hist.columns) == HISTORY_COLUMNS
        # each stage starts from the one before
        changed = [
            k for k in ckpt["model"] if not torch.equal(ckpt["model"][k], previous["model"][k])
        ]
        assert changed
        previous = ckpt
    frozen = catalog["frozen.checkpoint"].load()
    init = catalog["initial_checkpoint"].load()
    stem = "0.conv_stem.weight"
    assert torch.equal(frozen["model"][stem], init["model"][stem])  # frozen body convolution
    assert not torch.equal(
        catalog["unfrozen.checkpoint"].load()["model"][stem], init["model"][stem]
    )
    assert (tmp_path / "out" / "resume" / "mixup" / "last.pt").is_file()
    # AdamW as fastai's Learner: fresh after unfreeze, carried from unfrozen into mixup (the
    # step counts go on), every stage's final state kept in its checkpoint with its freeze
    steps = {}
    for stage in ("frozen", "unfrozen", "mixup"):
        opt = catalog[f"{stage}.checkpoint"].load()["optimizer"]
        assert opt["freeze"] == (stage == "frozen")
        steps[stage] = {float(s["step"]) for s in opt["state"]["state"].values()}
    per_epoch = len(catalog["unfrozen.history"].load())  # one epoch each at test size
    assert len(steps["unfrozen"]) == len(steps["mixup"]) == 1 and per_epoch == 1
    (unfrozen_steps,) = steps["unfrozen"]
    assert steps["mixup"] == {2 * unfrozen_steps}  # the same steps per epoch, counted on
    metrics = catalog["metrics"].load()
    assert metrics["stage"] == "mixup" and metrics["tta"] == {
        "n": 2,
        "beta": 0.25,
        "use_max": False,
    }
    assert metrics["plain"]["n"] == metrics["with_tta"]["n"] == 3  # 1 validation image per class
    assert set(metrics["with_tta"]["per_class"]) == {"alpha", "beta", "gamma"}
    interp = catalog["interpretation"].load()
    cm = interp["confusion_matrix"]
    assert len(cm) == 3 and sum(map(sum, cm)) == 3 and interp["predictions"] == "tta"
    assert len(interp["top_losses"]) == 3 and interp["top_losses"][0]["path"].endswith(".jpg")
    losses = [t["loss"] for t in interp["top_losses"]]
    assert losses == sorted(losses, reverse=True)
    assert sum(c[2] for c in interp["most_confused"]) == 3 - sum(cm[i][i] for i in range(3))
    # every figure saved, non-empty, of its size in pixels (figsize * 100 dpi)
    expected = {
        "confusion_matrix": (1200, 550),
        "top_losses": (1200, 400),  # 3 images: one row of 3
        "training_curves": (1200, 450),
        "lr_find": (600, 400),
        "show_batch": (1200, 1200),  # 9 images: 3 rows of 3
    }
    for name, size in expected.items():
        path = tmp_path / "out" / f"{name}.png"
        assert path.stat().st_size > 5_000, name
        with Image.open(path) as im:
            assert im.size == size, name
            assert np.asarray(im.convert("L")).std() > 5, name  # not a blank canvas

    # the exported model describes itself, and cassava_predict uses it on a folder
    card = catalog["exported_model"].load().card
    assert (card.stage, card.image_size, card.presize) == ("mixup", 32, 40)
    assert card.classes == ("alpha", "beta", "gamma") and card.class_ids == ("0", "1", "2")
    assert card.mean == (0.5, 0.5, 0.5) and card.arch == "tf_efficientnet_lite0"
    SequentialRunner().run(register_pipelines()["cassava_predict"], catalog)
    submission = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert len(submission) == 18 and set(submission["label"]) <= {0, 1, 2}


SWITCHED_OFF = {  # which stages have epochs: 0 -> (the stage the final weights come from)
    "fine_tune": (("mixup",), "unfrozen"),  # the seeds' fine_tune: frozen then unfrozen
    "unfrozen_from_the_start": (("frozen",), "mixup"),
    "nothing_trained": (("frozen", "unfrozen", "mixup"), "initial"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SWITCHED_OFF))
def test_stages_switched_off_pass_their_checkpoint_on(kaggle_dir: Path, params, tmp_path, case):
    off, final = SWITCHED_OFF[case]
    params = shrink_training(params)
    for stage in off:
        params[stage]["train"]["epochs"] = 0
    if "frozen" in off:  # no training stage asks for lr: auto -> lr_find is skipped...
        params["unfrozen"]["train"]["lr"] = [1e-5, 1e-3]
    if case == "unfrozen_from_the_start":  # ... unless asked for its plot alone
        params["lr_find"]["always"] = True
    if case == "fine_tune":  # fastai's: frozen at slice(base_lr), the last epoch kept
        params["frozen"]["train"]["lr"] = [2e-3]
        params["unfrozen"]["train"]["monitor"] = "last"
        params["lr_find"]["always"] = True
    catalog = make_catalog(kaggle_dir, params, tmp_path / "out")
    SequentialRunner().run(register_pipelines()["cassava"], catalog)

    previous = catalog["initial_checkpoint"].load()
    for stage in ("frozen", "unfrozen", "mixup"):
        ckpt = catalog[f"{stage}.checkpoint"].load()
        history = pd.read_csv(tmp_path / "out" / f"history_{stage}.csv")
        assert tuple(history.columns) == HISTORY_COLUMNS
        if stage in off:  # passed on unchanged, bit for bit, with an empty history
            assert history.empty
            assert ckpt["stage"] == previous["stage"]
            assert stage in ckpt["skipped"]
            for k, v in previous["model"].items():
                assert torch.equal(ckpt["model"][k], v), (stage, k)
        else:
            assert len(history) == 1 and ckpt["stage"] == stage
        previous = ckpt
    sweep = catalog["lr_find_result"].load()
    if "frozen" in off and case != "unfrozen_from_the_start":
        assert sweep["skipped"] == "no training stage uses lr: auto" and sweep["lrs"] == []
    else:
        assert "skipped" not in sweep and len(sweep["lrs"]) > 2
    metrics = catalog["metrics"].load()
    assert metrics["stage"] == final and metrics["skipped"] == list(off)
    if case == "fine_tune":  # which epoch the final weights are, and why
        assert (metrics["kept_epoch"], metrics["monitor"]) == (0, "last")
    assert 0 <= metrics["with_tta"]["accuracy"] <= 1 and metrics["plain"]["n"] == 3
    card = catalog["exported_model"].load().card
    assert card.stage == final and card.extra["skipped"] == list(off)
    for name in PLOTS:  # every figure drawn (an lr_find or curves figure says what was skipped)
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 5_000, name
