"""A stage's resume files and lr_find's sweep cache: find, verify, set aside, save.

timm keeps its recovery files beside the loop (``timm/utils/checkpoint_saver.py``); so does this
module for :class:`~.learner.Trainer`. A stage writes ``last.pt`` after every epoch (the file
before it becomes ``prev.pt``), each with the sha256 of its content and the fingerprint of what
it was computed from (:mod:`.provenance`). A damaged file is set aside as ``*.corrupt`` and the
epoch before it is used; a file from other inputs is moved into ``kept/`` (:mod:`.kept`) and
brought back when those inputs return.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import write_atomic
from .integrity import (
    IntegrityError,
    NoDigestError,
    content_sha256,
    display_path,
    load_checkpoint,
    save_checkpoint,
)
from .kept import KEPT_FOLDER, KeepPolicy, Kept
from .provenance import digest, explain

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2  # 2: fingerprints record every input (provenance)
RESUME_FILES = ("last.pt", "prev.pt")  # this epoch's state, and the one before it


class ResumeFiles:
    """The resume files of one stage in ``folder``."""

    def __init__(self, folder: Path, stage: str, keep: KeepPolicy) -> None:
        self.folder, self.stage, self.keep = Path(folder), stage, keep

    @property
    def last(self) -> Path:
        return self.folder / RESUME_FILES[0]

    def find(self, fabric, fp: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact resume file and its content, the same on every rank: rank 0
        chooses (setting a damaged one aside, bringing back a kept run of ``fp``'s inputs) and
        the others load the one it names, so that no two ranks decide differently."""
        if fabric.world_size == 1:
            return self._choose(fp)
        found = self._choose(fp) if fabric.is_global_zero else None
        choice = fabric.broadcast(found[0].name if found is not None else None, src=0)
        if fabric.is_global_zero or choice is None:
            return found
        path = self.folder / choice
        return path, load_checkpoint(path, todo="rank 0 verified it a moment ago; rerun the stage")

    def set_aside(self, path: Path, saved: dict[str, Any]) -> Path | None:
        """Move a resume file from other inputs into the kept folder, under its fingerprint;
        the older epoch's file beside it goes (it is of the same run). Where it went, or None."""
        fp = saved.get("fingerprint")
        if not isinstance(fp, dict):  # an older version's file: no record of its inputs
            return None
        where = Kept(self.folder / KEPT_FOLDER, self.keep, ".pt").store(path, digest(fp))
        for file in RESUME_FILES:
            (self.folder / file).unlink(missing_ok=True)
        return where

    def save(self, state: dict[str, Any]) -> None:
        """Write this epoch's resume file with its sha256; the previous one becomes prev.pt."""
        write_atomic(
            self.last,
            lambda fh: save_checkpoint(state, fh),
            keep_previous=self.folder / RESUME_FILES[1],
        )

    def _newest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact resume file and its content, or None; a damaged one (its content
        does not match its sha256, truncated, foreign) is set aside as ``*.corrupt`` with a
        warning, and the previous epoch's file is tried instead."""
        for file in RESUME_FILES:
            path = self.folder / file
            if not path.exists():
                continue
            try:
                return path, load_checkpoint(path, todo="It is not used")
            except NoDigestError:
                logger.info(
                    "%s: %s has no record of its inputs (an older version); training from the "
                    "start",
                    self.stage,
                    display_path(path),
                )
                return None
            except IntegrityError as e:
                corrupt = path.with_name(f"{path.name}.corrupt")
                os.replace(path, corrupt)
                logger.warning(
                    "%s: %s is damaged (%s); set aside as %s, resuming from the state before it",
                    self.stage,
                    display_path(path),
                    e.problem,
                    corrupt.name,
                )
        return None

    def _choose(self, fp: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact resume file; when it comes from other inputs than ``fp`` and a run
        from ``fp``'s was kept, that one is put back in its place first (and the other kept in
        turn)."""
        found = self._newest()
        if found is not None and explain(found[1].get("fingerprint"), fp) is None:
            return found
        match = Kept(self.folder / KEPT_FOLDER, self.keep, ".pt").take(digest(fp))
        if match is None:
            return found
        if found is not None:
            self.set_aside(*found)
        os.replace(match, self.last)
        logger.info(
            "%s: %s held a run from these same inputs (kept when they last changed); back in place",
            self.stage,
            display_path(match),
        )
        return self._newest()


def snapshot(state: dict[str, Any], fp: dict[str, Any], model, opt, sched, gens) -> dict[str, Any]:
    """Everything a resumed stage needs to end bit for bit where an uninterrupted one ends:
    the loop's ``state``, weights, optimizer, schedule and every random stream."""
    aug_gen, mix_gen = gens
    return {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fp,
        **state,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "aug_rng": aug_gen.get_state(),
        "mix_rng": mix_gen.get_state(),
    }


def restore(saved: dict[str, Any], model, opt, sched, gens) -> None:
    """Put a :func:`snapshot`'s weights, optimizer, schedule and random streams back."""
    aug_gen, mix_gen = gens
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    aug_gen.set_state(saved["aug_rng"])
    mix_gen.set_state(saved["mix_rng"])


def load_sweep(path: Path, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The lr_find sweep stored in ``path`` if it is intact and was computed from ``fp``."""
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        body = {"fingerprint": stored["fingerprint"], "result": stored["result"]}
        intact = stored["sha256"] == content_sha256(body)
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        logger.warning(
            "lr_find: %s is damaged (its content does not match its sha256); sweeping again",
            display_path(path),
        )
        return None
    reason = explain(stored["fingerprint"], fp)
    if reason is not None:
        logger.info("lr_find: %s %s; sweeping again", display_path(path), reason)
        return None
    logger.info(
        "lr_find: %s holds this sweep (same inputs): suggested lr (valley) %.3g, reusing it",
        display_path(path),
        stored["result"]["suggestion"],
    )
    return stored["result"]


def save_sweep(path: Path, fp: dict[str, Any], result: dict[str, Any]) -> None:
    """Store an lr_find sweep with the fingerprint of its inputs and its sha256."""
    body = {"fingerprint": fp, "result": result}
    payload = json.dumps({**body, "sha256": content_sha256(body)}).encode()
    write_atomic(path, lambda fh: fh.write(payload))
