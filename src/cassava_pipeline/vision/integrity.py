"""Every file the pipeline writes carries a digest of its content, and is verified before use.

- checkpoints and resume files (``torch.save``d dicts): a ``sha256`` entry over their content
  (:func:`content_sha256`: every key, tensor dtype, shape and bytes, every plain value), written
  by :func:`save_checkpoint` and checked by :func:`load_checkpoint`;
- the exported model: the sha256 of its tensors in its safetensors header (:mod:`.export`);
- shards: the sha256 of every shard file and of the index in ``meta.json`` (:mod:`.shards`).

A file that fails is never used: :class:`IntegrityError` names the file, what was expected, what
was found and what to do. Loading never unpickles: torch's own advice to pass
``weights_only=False`` never reaches the user.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

DIGEST_KEY = "sha256"


def display_path(path: Path) -> str:
    """``path`` relative to the working directory (the project) where it lies under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class IntegrityError(ValueError):
    """A file that cannot be used as it is; the message names it and says what to do."""

    def __init__(self, path: str | Path, problem: str, todo: str):
        self.path, self.problem, self.todo = str(path), problem, todo
        super().__init__(f"{path}: {problem}. {todo}")


class NoDigestError(IntegrityError):
    """A checkpoint written before digests were recorded: not damaged, but unverifiable."""


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(("V" + json.dumps(obj, default=repr)).encode())


def content_sha256(obj: Any) -> str:
    """sha256 of a checkpoint's content: keys, tensors (dtype, shape, bytes) and plain values.

    Independent of the file's serialisation, so it is computed before writing and stored inside.
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_checkpoint(obj: dict[str, Any], fh: BinaryIO) -> None:
    """``torch.save`` a dict with the sha256 of its content under ``sha256``."""
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    torch.save({**body, DIGEST_KEY: content_sha256(body)}, fh)


def load_tensors_file(path: str | Path, *, todo: str) -> Any:
    """``torch.load(weights_only=True)`` of a file, with errors that name it and say ``todo``.

    A file holding pickled objects (which could run code) is refused; torch's advice to pass
    ``weights_only=False`` is not passed on.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(path, "the file does not exist", todo) from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise IntegrityError(
            path,
            "it holds pickled objects other than tensors and plain values, which are never "
            "loaded (they could run code)",
            todo,
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise IntegrityError(path, f"it is truncated or not a torch file ({first})", todo) from None


def load_checkpoint(path: str | Path, *, todo: str) -> dict[str, Any]:
    """A checkpoint saved by :func:`save_checkpoint`, verified; :class:`IntegrityError` otherwise.

    ``todo`` is what the user should do about a file that fails (rerun which pipeline, ...).
    """
    obj = load_tensors_file(path, todo=todo)
    if not isinstance(obj, dict):
        raise IntegrityError(path, f"it holds a {type(obj).__name__}, not a checkpoint", todo)
    expected = obj.pop(DIGEST_KEY, None)
    if expected is None:
        raise NoDigestError(
            path, "it has no sha256 of its content (written by an older version)", todo
        )
    actual = content_sha256(obj)
    if actual != expected:
        raise IntegrityError(
            path, f"its content does not match its sha256 (recorded {expected}, now {actual})", todo
        )
    return obj


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (about 1.9 GB/s with SHA-NI)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verified_file_sha256(path: str | Path, expected: str, size: int | None, todo: str) -> None:
    """Check a file's size and sha256 against what was recorded when it was written."""
    path = Path(path)
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        raise IntegrityError(path, "the file is missing", todo) from None
    if size is not None and actual_size != size:
        raise IntegrityError(
            path, f"it holds {actual_size} bytes, {size} were written (truncated or changed)", todo
        )
    actual = file_sha256(path)
    if actual != expected:
        raise IntegrityError(
            path, f"its content does not match its sha256 (recorded {expected}, now {actual})", todo
        )
