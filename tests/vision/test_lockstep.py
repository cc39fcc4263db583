"""Ours' training math against fastai's Learner, in float64, in lock-step (no fastai here).

``benchmarks/fastai_lockstep.py`` ran fastai 2.8.12 on the set of ``tests/lockstep.py`` with
ours' inputs, batch order and MixUp draws, and wrote its per-epoch losses and accuracy and its
weights after each stage to ``tests/golden/lockstep.json``. Here ours' real stage code
(``train_in_fabric`` at precision 64-true) runs the same three stages: they must agree to 1e-6.
Changing one piece of the math that fastai fixes (Adam's eps, weight decay on BatchNorm, AdamW's
state kept across the unfreeze) must make them disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cassava_pipeline.vision import learner
from tests import lockstep

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "lockstep.json").read_text())
TOL = 1e-6


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return lockstep.shards(tmp_path_factory.mktemp("lockstep"))


def _differences(ours: list[dict]) -> dict[str, float]:
    """The largest absolute difference per stage, over its epochs' metrics and its weights."""
    out = {}
    for mine, ref in zip(ours, GOLDEN["stages"], strict=True):
        worst = 0.0
        for row, want in zip(mine["history"], ref["epochs"], strict=True):
            for key in ("train_loss", "valid_loss", "accuracy"):
                worst = max(worst, abs(row[key] - want[key]))
        summary = lockstep.weight_summary(mine["weights"])
        assert summary.keys() == ref["weights"].keys()
        for key, values in ref["weights"].items():
            scale = max(1.0, abs(values[1]) ** 0.5)  # sums of squares: relative to their size
            worst = max(
                worst,
                *(
                    abs(a - b) / (scale if i < 2 else 1.0)
                    for i, (a, b) in enumerate(zip(summary[key], values, strict=True))
                ),
            )
        out[ref["name"]] = worst
    return out


@pytest.mark.slow
def test_three_stages_agree_with_fastais_learner_in_float64(images):
    ours = lockstep.train_ours(images)
    assert [len(s["history"]) for s in ours] == [len(s["epochs"]) for s in GOLDEN["stages"]]
    worst = _differences(ours)
    assert max(worst.values()) < TOL, worst


@pytest.mark.slow
@pytest.mark.parametrize(
    "mutation",
    ["eps 1e-8", "weight decay on BatchNorm", "AdamW state kept across the unfreeze"],
)
def test_a_change_in_the_math_breaks_the_agreement(images, monkeypatch, mutation):
    """Each of these is a way fastai's training differs from a textbook AdamW loop."""
    stages = lockstep.STAGES
    if mutation == "eps 1e-8":  # torch's default eps instead of fastai's 1e-5
        stages = tuple(lockstep.changed(s, eps=1e-8) for s in stages)
    elif mutation == "weight decay on BatchNorm":
        monkeypatch.setattr(learner, "no_decay_params", lambda model: set())
    else:  # carried from the frozen stage into the unfrozen one, which fastai clears
        real = learner.carried_state

        def keep_across_unfreeze(carried, cfg, opt):
            if carried and carried.get("state") is not None:
                carried = {**carried, "freeze": cfg.freeze}
            return real(carried, cfg, opt)

        monkeypatch.setattr(learner, "carried_state", keep_across_unfreeze)
    worst = _differences(lockstep.train_ours(images, stages))
    assert max(worst.values()) > 100 * TOL, (mutation, worst)
