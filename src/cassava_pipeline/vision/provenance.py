"""What a cached result was computed from, and why a stored one no longer applies.

A finished training stage, a resume file or an lr_find sweep is reused only when every input
that determines its numbers is equal. Its *fingerprint* is a flat dict of those inputs, each
part a plain value or a digest: the stage settings, the learning rate actually used, the shards'
content digests (:mod:`.presize` records them when writing), the starting weights, the precision,
device type and world size, a digest of each module whose code affects the numbers, and the
versions of the packages that compute them. :func:`explain` names the first part that differs,
in words a user can act on.

Each stage also draws its own random streams (:func:`stage_seed`): the same ``seed`` under
another stage name gives other shuffles, crops, augmentations and mixup draws.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

FINGERPRINT_VERSION = 2

# Modules whose code changes the numbers a training stage or lr_find computes (by file name,
# next to this one). The shards' digest covers presizing; export and prediction come after.
TRAINING_MODULES = (
    "augment.py",
    "data.py",
    "learner.py",
    "models.py",
    "provenance.py",
    "resume.py",
    "run.py",
    "schedule.py",
    "shards.py",
)
# Packages whose versions change those numbers (kernels, resampling, RNGs, decoders).
TRAINING_PACKAGES = ("torch", "torchvision", "timm", "lightning-fabric", "numpy", "pillow")

# Parts of a fingerprint with what a difference means, causes before consequences: other code,
# packages, precision, device or world size change every number downstream (lr_find's
# suggestion, hence the learning rate, and the weights a later stage starts from), and other
# settings or shards change the learning rate and the starting weights too.
_PARTS = (
    ("code", "was trained by other code"),
    ("packages", "was trained with other package versions"),
    ("precision", "was trained at another precision"),
    ("device", "was trained on another device type"),
    ("world_size", "was trained by another number of processes"),
    ("settings", "was trained with other stage settings"),
    ("shards", "was trained on other shards"),
    ("lr", "was trained at another learning rate"),
    ("start", "started from other weights (an earlier stage or the model changed)"),
    ("optimizer", "started from another optimizer state (the previous stage's, or a fresh one)"),
)
# Parts of the shards' content digest (see presize.content_digests), in words.
SHARD_PARTS = {
    "split": "split changed",
    "labels": "labels or files changed",
    "images": "source images changed",
    "presize": "presize changed",
    "classes": "classes changed",
    "pixels": "pixels changed",
}


def digest(obj: Any) -> str:
    """blake2b-128 of a JSON-serialisable value (keys sorted): equal values, equal digests."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def stage_seed(seed: int, name: str) -> int:
    """The seed of a stage's random streams, from the run's ``seed`` and the stage's name.

    31 bits: it is multiplied and offset by epoch and rank further on, inside 64 bits.
    """
    h = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2**31 - 1)


def module_digests(names: tuple[str, ...]) -> dict[str, str]:
    """blake2b-128 of the source of each module of ``vision`` named (by file name)."""
    here = Path(__file__).parent
    return {
        name: hashlib.blake2b((here / name).read_bytes(), digest_size=16).hexdigest()
        for name in names
    }


def versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the packages named (``none`` where one is absent)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "none"
    return out


@cache
def code_digests() -> dict[str, str]:
    """blake2b-128 of the source of each module in :data:`TRAINING_MODULES`."""
    return module_digests(TRAINING_MODULES)


@cache
def package_versions() -> dict[str, str]:
    """Installed versions of :data:`TRAINING_PACKAGES` (``none`` where one is absent)."""
    return versions(TRAINING_PACKAGES)


def fingerprint(
    *,
    settings: dict[str, Any],
    lr: Any,
    shards: dict[str, str],
    start: str,
    precision: str,
    device: str,
    world_size: int,
    optimizer: str | None = None,
) -> dict[str, Any]:
    """Everything a stage's (or a sweep's) result is computed from, as one comparable dict.

    ``optimizer``: the digest of the optimizer state a stage starts from ("fresh" for none).

    Plain JSON values (tuples become lists), so a copy stored in a checkpoint or a JSON file
    compares equal to a fresh one.
    """
    fp = {
        "version": FINGERPRINT_VERSION,
        "settings": settings,
        "lr": lr,
        "shards": dict(shards),
        "start": start,
        "precision": precision,
        "device": device,
        "world_size": int(world_size),
        "code": code_digests(),
        "packages": package_versions(),
    }
    if optimizer is not None:
        fp["optimizer"] = optimizer
    return json.loads(json.dumps(fp))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [
            k for key in keys for k in _changed_keys(old.get(key), new.get(key), prefix + key + ".")
        ]
    return [] if old == new else [prefix.rstrip(".")]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:21] + "..."


def shards_difference(
    old: dict[str, str] | None, new: dict[str, str], ignore: tuple[str, ...] = ()
) -> str | None:
    """How two shard sets' content digests differ (``split changed, ...``); None if equal.

    ``ignore``: parts (of :data:`SHARD_PARTS`) whose change does not count, e.g. ``presize`` and
    ``pixels`` when only the images and their split must be the same.
    """
    if (old or {}).get("digest") == new.get("digest"):
        return None
    changed = [k for k in SHARD_PARTS if (old or {}).get(k) != new.get(k)]
    if not changed:
        return "no record of them"
    return ", ".join(SHARD_PARTS[k] for k in changed if k not in ignore) or None


def _detail(part: str, old: Any, new: Any) -> str:
    if part == "shards":
        return shards_difference(old, new) or ""
    if part == "code":
        return ", ".join(f"{k} changed" for k in _changed_keys(old, new)) or "changed"
    if part in ("settings", "packages"):
        keys = _changed_keys(old, new)
        shown = [f"{k} {_short(_get(old, k))} -> {_short(_get(new, k))}" for k in keys[:3]] + (
            ["..."] if len(keys) > 3 else []
        )
        return ", ".join(shown)
    if part == "start":
        return ""
    return f"{_short(old)} -> {_short(new)}"


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def explain(saved: Any, current: dict[str, Any]) -> str | None:
    """Why ``saved`` (a stored fingerprint) does not match ``current``; None when it does.

    The first differing part, e.g. ``was trained on other shards (split changed)``.
    """
    if saved == current:
        return None
    if not isinstance(saved, dict) or saved.get("version") != current["version"]:
        return "was written by an older version of cassava-pipeline (no record of its inputs)"
    for part, words in _PARTS:
        if saved.get(part) != current.get(part):
            detail = _detail(part, saved.get(part), current.get(part))
            return f"{words} ({detail})" if detail else words
    return "differs in its recorded inputs"  # pragma: no cover - every part is compared above
