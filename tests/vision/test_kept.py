"""Earlier results kept by fingerprint (vision/kept.py): the count and size limits, oldest out."""

from __future__ import annotations

import os
from pathlib import Path

from cassava_pipeline.vision.kept import KeepPolicy, Kept


def _result(tmp_path: Path, name: str, size: int, folder: bool = False) -> Path:
    path = tmp_path / "work" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        path.mkdir()
        (path / "shard-0.bin").write_bytes(b"x" * size)
    else:
        path.write_bytes(b"x" * size)
    return path


def test_kept_results_are_bounded_by_count_and_size_least_recently_used_out(tmp_path: Path):
    kept = Kept(tmp_path / "kept", KeepPolicy(entries=2, max_gib=1000 / 2**30), ".pt")
    for key in ("a", "b", "c"):  # the third pushes out the first
        assert kept.store(_result(tmp_path, key, 300), key) == tmp_path / "kept" / f"{key}.pt"
    assert [p.name for p in kept.entries()] == ["c.pt", "b.pt"]
    assert kept.take("a") is None and kept.take("b") == tmp_path / "kept" / "b.pt"
    kept.store(_result(tmp_path, "d", 500), "d")  # 500 + 300 fit in 1000; b is the third
    assert [p.name for p in kept.entries()] == ["d.pt", "c.pt"]
    kept.store(_result(tmp_path, "e", 600), "e")  # 600 + 500 would not: d and c go
    assert [p.name for p in kept.entries()] == ["e.pt"]
    # the same key again: the newer result replaces the kept one
    kept.store(_result(tmp_path, "e2", 10), "e")
    assert (tmp_path / "kept" / "e.pt").stat().st_size == 10
    # a result larger than the limit alone is not kept, and not left behind either
    big = _result(tmp_path, "big", 2000)
    assert kept.store(big, "big") is None and not big.exists()
    # folders (shard sets) are kept and measured the same way
    shards = Kept(tmp_path / "kept-shards", KeepPolicy(entries=3, max_gib=1.0))
    where = shards.store(_result(tmp_path, "set", 100, folder=True), "k1")
    assert (where / "shard-0.bin").read_bytes() == b"x" * 100
    # nothing kept when entries is 0 (the behaviour before)
    none = Kept(tmp_path / "none", KeepPolicy(entries=0))
    gone = _result(tmp_path, "gone", 5)
    assert none.store(gone, "g") is None and not gone.exists() and not none.entries()


def test_entries_are_ordered_by_last_use(tmp_path: Path):
    kept = Kept(tmp_path / "kept", KeepPolicy(entries=5))
    for i, key in enumerate(("old", "new")):
        entry = kept.store(_result(tmp_path, key, 1), key)
        os.utime(entry, ns=(i * 10**9, i * 10**9))
    assert [p.name for p in kept.entries()] == ["new", "old"]
