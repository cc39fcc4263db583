"""Verify every listed image and build the manifest and the data report.

Each file is read once, hashed, and decoded (JPEGs at 1/8 scale: every byte is read, so
truncation is caught). Unusable files are excluded with their reason; the report lists them all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from .images import DEFAULT_MAX_PIXELS, ImageError, inspect_image, read_bytes
from .layouts import CsvLayout, FolderLayout, Layout, Listing, RegexLayout, Rejected, list_images
from .options import STRICT, Fraction, NonNegativeInt, PositiveInt, check_choices
from .parallel import chunked, ordered_map, resolve_workers

MANIFEST_COLUMNS = [
    "path",  # relative to the raw image root, posix separators
    "label",  # index into the class vocabulary (report["classes"])
    "label_name",
    "is_valid",  # the layout's own split (True/False), or <NA> when it has none
    "width",  # after EXIF orientation
    "height",
    "hash",  # blake2b-128 of the file's bytes: equal for byte-identical files
    "format",  # as PIL reads the file (JPEG, PNG, GIF, ...), whatever its extension says
    "mode",  # PIL's mode before conversion to RGB (RGB, L, RGBA, P, CMYK, I;16, ...)
]


class IngestError(RuntimeError):
    """Too much of the data set is unusable; the message lists the first files and reasons."""


@dataclass(frozen=True)
class IngestOptions:
    """Which layout to read, how to verify its files, and how many may be unusable."""

    __pydantic_config__ = STRICT

    layout: Literal["csv", "folder", "regex"] = "csv"  # which of the three sections is read
    csv: CsvLayout = field(default_factory=CsvLayout)
    folder: FolderLayout = field(default_factory=FolderLayout)
    regex: RegexLayout = field(default_factory=RegexLayout)
    max_excluded_fraction: Fraction = 0.01  # more unusable files than this stop the run
    max_image_pixels: PositiveInt = DEFAULT_MAX_PIXELS  # PIL's decompression-bomb limit
    workers: NonNegativeInt = 0  # processes; 0 = all cores
    chunk_size: PositiveInt = 64  # files per task sent to a worker
    report_path: str = "the data report"  # how messages name the report (the pipeline: its path)

    def __post_init__(self) -> None:
        check_choices(self, "ingest")

    @property
    def chosen_layout(self) -> Layout:
        """The section that ``layout`` names."""
        return {"csv": self.csv, "folder": self.folder, "regex": self.regex}[self.layout]


def _verify_chunk(args: tuple[str, Sequence[str], int]) -> list[tuple]:
    root, paths, max_pixels = args
    out = []
    for rel in paths:
        try:
            info = inspect_image(read_bytes(str(Path(root) / rel)), max_pixels=max_pixels)
            out.append((info.width, info.height, info.mode, info.format, info.hash))
        except ImageError as e:
            out.append((e.reason, e.detail))
    return out


def verify_images(root: Path, paths: Sequence[str], options: IngestOptions) -> list[tuple]:
    """Inspect each path; a 5-tuple (width, height, mode, format, hash) or (reason, detail)."""
    workers = resolve_workers(options.workers)
    if len(paths) < 2 * options.chunk_size:
        workers = 1  # a pool costs more than it saves on a handful of files
    tasks = [(str(root), c, options.max_image_pixels) for c in chunked(paths, options.chunk_size)]
    results: list[tuple] = []
    for chunk_result in ordered_map(_verify_chunk, tasks, workers=workers):
        results.extend(chunk_result)
    return results


def ingest(root: Path, layout: Layout, options: IngestOptions) -> tuple[pd.DataFrame, dict]:
    """List, verify and describe the images under ``root``; returns (manifest, report)."""
    listing = list_images(root, layout)
    return build_manifest(root, listing, options)


def build_manifest(
    root: Path, listing: Listing, options: IngestOptions
) -> tuple[pd.DataFrame, dict]:
    """Verify the listing's candidates and assemble the manifest and the report."""
    cand = listing.candidates
    results = verify_images(root, list(cand["path"]), options)
    excluded: list[Rejected] = list(listing.rejected)
    keep, infos = [], []
    for i, res in enumerate(results):
        if len(res) == 2:
            excluded.append(Rejected(cand["path"].iat[i], res[0], res[1]))
        else:
            keep.append(i)
            infos.append(res)
    good = cand.iloc[keep].reset_index(drop=True)
    info = pd.DataFrame(infos, columns=["width", "height", "mode", "format", "hash"])
    good = pd.concat([good, info], axis=1)

    counts = Counter(good["label_name"])
    vocab = [c for c in listing.classes if counts.get(c, 0) > 0]
    empty = [c for c in listing.classes if counts.get(c, 0) == 0]
    index = {c: i for i, c in enumerate(vocab)}
    ids = dict(zip(listing.classes, listing.class_ids, strict=True)) if listing.class_ids else {}

    manifest = pd.DataFrame(
        {
            "path": good["path"].astype(str),
            "label": good["label_name"].map(index).astype("int64"),
            "label_name": good["label_name"].astype(str),
            "is_valid": pd.array(good["is_valid"].tolist(), dtype="boolean"),
            "width": good["width"].astype("int64"),
            "height": good["height"].astype("int64"),
            "hash": good["hash"].astype(str),
            "format": good["format"].astype(str),
            "mode": good["mode"].astype(str),
        },
        columns=MANIFEST_COLUMNS,
    )
    # The files whose format or mode differs from the data set's usual one (JPEG, RGB for
    # photos): named, since each is converted to RGB and a stray GIF or 16-bit PNG is worth a look
    usual_format = manifest["format"].mode().iat[0] if len(manifest) else None
    usual_mode = manifest["mode"].mode().iat[0] if len(manifest) else None
    odd = manifest[(manifest["format"] != usual_format) | (manifest["mode"] != usual_mode)]
    n_total = len(cand) + len(listing.rejected)
    dup = int(manifest["hash"].duplicated().sum())
    report = {
        "root": str(root),
        "n_listed": n_total,
        "n_images": len(manifest),
        "n_excluded": len(excluded),
        "excluded_fraction": (len(excluded) / n_total) if n_total else 0.0,
        "excluded_by_reason": dict(Counter(r.reason for r in excluded).most_common()),
        "classes": [
            {"index": index[c], "name": c, "source_id": ids.get(c), "count": counts[c]}
            for c in vocab
        ],
        "empty_classes": empty,
        "has_split": listing.has_split,
        "duplicate_files": dup,
        "modes": dict(Counter(good["mode"]).most_common()),
        "formats": dict(Counter(good["format"]).most_common()),
        "unusual_files": [
            {"path": p, "format": f, "mode": m}
            for p, f, m in zip(odd["path"], odd["format"], odd["mode"], strict=True)
        ],
        "size": _size_summary(manifest),
        "ignored_hidden_files": list(listing.ignored),
        "layout_notes": list(listing.notes),
        "excluded": [{"path": r.path, "reason": r.reason, "detail": r.detail} for r in excluded],
    }
    return manifest, report


def _size_summary(manifest: pd.DataFrame) -> dict:
    if manifest.empty:
        return {}
    w, h = manifest["width"], manifest["height"]
    common = Counter(zip(w, h, strict=True)).most_common(1)[0][0]
    return {
        "min_width": int(w.min()),
        "max_width": int(w.max()),
        "min_height": int(h.min()),
        "max_height": int(h.max()),
        "most_common": f"{common[0]}x{common[1]}",
    }


def check_exclusions(report: dict, options: IngestOptions, *, show: int = 10) -> None:
    """Raise :class:`IngestError` when more than ``options.max_excluded_fraction`` of the files
    was excluded."""
    max_excluded_fraction, report_path = options.max_excluded_fraction, options.report_path
    if report["n_images"] == 0:
        raise IngestError(
            f"No usable image among {report['n_listed']} listed in {report['root']}. "
            + _first_lines(report, show)
            + " Check ingest.layout and its settings in parameters_ingest.yml."
        )
    frac = report["excluded_fraction"]
    if frac > max_excluded_fraction:
        raise IngestError(
            f"{report['n_excluded']:,} of {report['n_listed']:,} listed files "
            f"({frac:.1%}) were excluded, more than ingest.max_excluded_fraction="
            f"{max_excluded_fraction} allows. By reason: {report['excluded_by_reason']}. "
            + _first_lines(report, show)
            + f" The data report ({report_path}) lists every file. Fix or "
            "remove those files (or the CSV rows naming them), or raise "
            "ingest.max_excluded_fraction if losing them is acceptable."
        )


def _first_lines(report: dict, show: int) -> str:
    rows = report["excluded"][:show]
    if not rows:
        return ""
    lines = "; ".join(
        f"{r['path']}: {r['reason']}" + (f" ({r['detail']})" if r["detail"] else "") for r in rows
    )
    more = report["n_excluded"] - len(rows)
    return f"First {len(rows)}: {lines}" + (f"; and {more:,} more." if more > 0 else ".")


def summarise(report: dict) -> list[str]:
    """Log lines summarising a data report."""
    lines = [
        f"{report['n_images']:,} images in {len(report['classes'])} classes from {report['root']}; "
        f"{report['n_excluded']:,} excluded ({report['excluded_fraction']:.2%})",
        "classes: " + ", ".join(f"{c['name']}={c['count']}" for c in report["classes"]),
    ]
    if report["excluded_by_reason"]:
        lines.append(f"excluded by reason: {report['excluded_by_reason']}")
    if report["empty_classes"]:
        lines.append(f"empty classes (left out of the vocabulary): {report['empty_classes']}")
    if report["duplicate_files"]:
        lines.append(f"{report['duplicate_files']} byte-identical duplicate files")
    return lines


def unusual_lines(report: dict, show: int = 10) -> list[str]:
    """Warnings naming the files in a format or mode other than the data set's usual one."""
    odd = report.get("unusual_files", [])
    if not odd:
        return []
    named = "; ".join(f"{r['path']} ({r['format']}, {r['mode']})" for r in odd[:show])
    more = f"; and {len(odd) - show:,} more (data report: unusual_files)" if len(odd) > show else ""
    return [
        f"{len(odd):,} file(s) in an unusual format or mode, converted to RGB: {named}{more}. "
        f"Formats: {report['formats']}; modes: {report['modes']}"
    ]
