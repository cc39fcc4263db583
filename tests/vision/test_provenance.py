"""Fingerprints: stable stage seeds, and a difference explained by its cause."""

from __future__ import annotations

import copy

from cassava_pipeline.vision import provenance
from cassava_pipeline.vision.provenance import explain, fingerprint, shards_difference, stage_seed

SHARDS = {
    "split": "s1",
    "labels": "l1",
    "images": "i1",
    "presize": "p1",
    "classes": "c1",
    "pixels": "x1",
    "digest": "d1",
}


def _fp(**kw) -> dict:
    args = {
        "settings": {"epochs": 3, "wd": 0.01, "augment": {"size": 224, "max_rotate": 10.0}},
        "lr": [1e-6, 1e-4],
        "shards": SHARDS,
        "start": "w1",
        "precision": "32-true",
        "device": "cpu",
        "world_size": 1,
    }
    return fingerprint(**{**args, **kw})


def test_stage_seeds_differ_by_stage_and_never_change():
    assert stage_seed(42, "unfrozen") != stage_seed(42, "mixup") != stage_seed(42, "frozen")
    assert stage_seed(42, "mixup") != stage_seed(43, "mixup")
    # a pure function of (seed, name): the same on every machine and in every release
    assert stage_seed(42, "mixup") == stage_seed(42, "mixup") == 1790683617
    assert all(0 <= stage_seed(s, n) < 2**31 for s in range(50) for n in ("a", "b"))


def test_fingerprint_is_plain_json_and_records_code_and_packages():
    fp = _fp(lr=(1e-6, 1e-4))
    assert fp["lr"] == [1e-6, 1e-4]  # a tuple stored as a list compares equal after a reload
    assert set(fp["code"]) == set(provenance.TRAINING_MODULES)
    assert all(len(v) == 32 for v in fp["code"].values())
    assert fp["packages"]["torch"] != "none"
    assert explain(copy.deepcopy(fp), fp) is None


def test_explain_names_what_differs():
    base = _fp()
    cases = {
        "was trained with other stage settings (augment.size 224 -> 448, epochs 3 -> 5)": _fp(
            settings={"epochs": 5, "wd": 0.01, "augment": {"size": 448, "max_rotate": 10.0}}
        ),
        "was trained at another learning rate ([1e-06, 0.0001] -> [2e-06, 0.0001])": _fp(
            lr=[2e-6, 1e-4]
        ),
        "was trained on other shards (split changed)": _fp(
            shards={**SHARDS, "split": "s2", "digest": "d2"}
        ),
        "started from other weights (an earlier stage or the model changed)": _fp(start="w2"),
        "was trained at another precision (32-true -> bf16-mixed)": _fp(precision="bf16-mixed"),
        "was trained on another device type (cuda -> cpu)": None,
        "was trained by another number of processes (1 -> 2)": _fp(world_size=2),
    }
    for expected, current in cases.items():
        if current is None:  # a checkpoint from a GPU run, resumed on a CPU
            assert explain(_fp(device="cuda"), base) == expected
        else:
            assert explain(base, current) == expected
    edited = {**base, "code": {**base["code"], "augment.py": "0" * 32}}
    assert explain(edited, base) == "was trained by other code (augment.py changed)"
    upgraded = {**base, "packages": {**base["packages"], "torch": "0.1"}}
    assert explain(upgraded, base).startswith("was trained with other package versions (torch 0.1")


def test_the_cause_is_named_before_its_consequences():
    # other precision moves lr_find's suggestion and every later stage's starting weights
    cause = _fp(precision="bf16-mixed", lr=[3e-6, 1e-4], start="w2")
    assert explain(_fp(), cause) == "was trained at another precision (32-true -> bf16-mixed)"
    # other shards move the suggestion too
    moved = _fp(shards={**SHARDS, "pixels": "x2", "presize": "p2", "digest": "d2"}, lr=[1.0])
    assert explain(_fp(), moved) == "was trained on other shards (presize changed, pixels changed)"


def test_records_of_an_older_format_are_never_reused():
    assert explain("(settings, 27, 9, 1, 'abc', 1)", _fp()).startswith(
        "was written by an older version of cassava-pipeline"
    )
    assert explain(None, _fp()) is not None
    assert shards_difference(None, SHARDS) == ", ".join(provenance.SHARD_PARTS.values())
    assert shards_difference(SHARDS, dict(SHARDS)) is None
