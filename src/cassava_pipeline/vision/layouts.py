"""List the labelled images of a data set in the three layouts the seeds use.

- ``CsvLayout``: a CSV of file and label (Kaggle's ``train.csv``), optionally with an ``is_val``
  column and a JSON map from label id to class name.
- ``FolderLayout``: a folder per class, optionally under ``train/`` and ``valid/`` folders.
- ``RegexLayout``: the label is a regular expression group of the file name (Oxford pets).

A listing is a table of candidates (relative path, class name, is_valid) plus the rows that
could not become candidates (unknown label, duplicate row, ...), each with a reason. Nothing is
dropped without a line in ``rejected``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .options import STRICT, OptionError

CANDIDATE_COLUMNS = ["path", "label_name", "is_valid"]


class LayoutError(ValueError):
    """The data set's layout does not match the configuration; the message says what to fix."""


@dataclass(frozen=True)
class Rejected:
    """One file or row that is left out, and why."""

    path: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Listing:
    """Candidates to verify, the class vocabulary in label order, and what was rejected already."""

    candidates: pd.DataFrame
    classes: tuple[str, ...]
    rejected: tuple[Rejected, ...] = ()
    class_ids: tuple[str, ...] = ()  # the source's own label ids (Kaggle's 0..4), if it has any
    has_split: bool = False
    ignored: tuple[str, ...] = field(default=())  # hidden files skipped on purpose
    notes: tuple[str, ...] = ()  # how the layout was read, for the log and the report


@dataclass(frozen=True)
class CsvLayout:
    """Kaggle's layout: ``file`` lists ``image_column`` and ``label_column`` rows."""

    __pydantic_config__ = STRICT

    file: str = "train.csv"
    image_dir: str = "train_images"
    image_column: str = "image_id"
    label_column: str = "label"
    valid_column: str | None = "is_val"  # fastai's Cassava seed splits on this column when present
    label_map: str | None = "label_num_to_disease_map.json"  # null: the labels are class names


@dataclass(frozen=True)
class FolderLayout:
    """``root/<class>/<file>``, or ``root/train/<class>`` and ``root/valid/<class>``.

    With ``train/`` present, the validation folder is ``valid_folder`` or, when that is absent,
    the first of :data:`VALID_NAMES` found (``val/``, ``validation/``, ...); a ``test/`` folder is
    never training data and is left out (said in the log and the report). Top-level folders named
    like split folders without ``train/`` stop the run: they would otherwise become classes.
    """

    __pydantic_config__ = STRICT

    train_folder: str | None = "train"  # None: one folder per class at the top, never split
    valid_folder: str = "valid"


# The usual names of a validation folder (fastai's GrandparentSplitter uses train/ and valid/;
# torchvision's ImageFolder sets often come as train/ + val/), and of held-out test folders.
VALID_NAMES = ("valid", "val", "validation", "dev")
TEST_NAMES = ("test", "testing", "holdout")


@dataclass(frozen=True)
class RegexLayout:
    """Every file under ``image_dir``; its class is group 1 of ``pattern`` on the file name."""

    __pydantic_config__ = STRICT

    image_dir: str = "images"
    pattern: str = r"(.+)_\d+.jpg$"  # fastai's pets example: 'Maine_Coon_157.jpg' -> 'Maine_Coon'

    def __post_init__(self) -> None:
        try:
            groups = re.compile(self.pattern).groups
        except re.error as e:
            reason = f"not a regular expression ({e})"
            raise OptionError("pattern", self.pattern, reason, "ingest.regex") from e
        if groups < 1:
            reason = "needs a group, (...), that captures the class name"
            raise OptionError("pattern", self.pattern, reason, "ingest.regex")

    @property
    def regex(self) -> re.Pattern[str]:
        """The compiled pattern."""
        return re.compile(self.pattern)


Layout = CsvLayout | FolderLayout | RegexLayout


def list_images(root: Path, layout: Layout) -> Listing:
    """List the candidates of ``root`` according to ``layout``."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(
            f"The raw image folder {root} does not exist. Your own images: "
            "--params=data.raw=/path/to/images,ingest.layout=folder (or csv, regex; README, "
            "'Your own images'). The embedded sample: `make run` generates it. Kaggle's Cassava "
            "data: unpack it there and use --env=kaggle."
        )
    if isinstance(layout, CsvLayout):
        return _list_csv(root, layout)
    if isinstance(layout, FolderLayout):
        return _list_folders(root, layout)
    return _list_regex(root, layout)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _read_label_map(root: Path, layout: CsvLayout) -> dict[str, str] | None:
    if layout.label_map is None:
        return None
    path = root / layout.label_map
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise LayoutError(
            f"Label map {path} is missing; add it or set ingest.csv.label_map: null "
            "to use the labels themselves as class names"
        ) from e
    except json.JSONDecodeError as e:
        raise LayoutError(f"Label map {path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise LayoutError(f"Label map {path} must be a JSON object of label id -> class name")
    return {str(k).strip(): str(v) for k, v in raw.items()}


def _label_key(value: object) -> str:
    """Normalise a CSV label so that 3, '3' and 3.0 all name label id '3'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _sorted_ids(ids) -> list[str]:
    def key(s: str):
        return (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)

    return sorted(ids, key=key)


def _list_csv(root: Path, layout: CsvLayout) -> Listing:
    csv_path = root / layout.file
    try:
        table = pd.read_csv(csv_path, dtype={layout.image_column: str}, keep_default_na=True)
    except FileNotFoundError as e:
        raise LayoutError(
            f"{csv_path} is missing; ingest.layout is 'csv', which needs it "
            "(or set ingest.layout to 'folder' or 'regex')"
        ) from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise LayoutError(f"{csv_path} cannot be read as CSV: {e}") from e
    for col in (layout.image_column, layout.label_column):
        if col not in table.columns:
            raise LayoutError(
                f"{csv_path} has no column {col!r} (it has {list(table.columns)}); "
                "set ingest.csv.image_column / label_column"
            )
    label_map = _read_label_map(root, layout)
    has_split = layout.valid_column is not None and layout.valid_column in table.columns

    rejected: list[Rejected] = []
    rows: list[tuple[str, str, object]] = []
    seen: set[str] = set()
    for i, rec in enumerate(table.to_dict("records")):
        image = rec.get(layout.image_column)
        line = f"{layout.file} row {i + 2}"  # +2: header line, 1-based
        if not isinstance(image, str) or not image.strip():
            rejected.append(Rejected(line, "missing file name"))
            continue
        rel = (Path(layout.image_dir) / image.strip()).as_posix()
        label = rec.get(layout.label_column)
        if label is None or (isinstance(label, float) and pd.isna(label)):
            rejected.append(Rejected(rel, "missing label", line))
            continue
        key = _label_key(label)
        if label_map is not None and key not in label_map:
            rejected.append(
                Rejected(
                    rel, "unknown label", f"{line}: label {key!r} is not in {layout.label_map}"
                )
            )
            continue
        if rel in seen:
            rejected.append(Rejected(rel, "duplicate row", f"{line} repeats an earlier row"))
            continue
        seen.add(rel)
        is_valid = _parse_bool(rec.get(layout.valid_column), line) if has_split else None
        if isinstance(is_valid, Rejected):
            rejected.append(Rejected(rel, is_valid.reason, is_valid.detail))
            continue
        rows.append((rel, label_map[key] if label_map is not None else key, is_valid))

    if label_map is not None:
        class_ids = tuple(_sorted_ids(label_map))
        classes = tuple(label_map[k] for k in class_ids)
    else:
        class_ids = tuple(_sorted_ids({r[1] for r in rows}))
        classes = class_ids
    candidates = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
    return Listing(candidates, classes, tuple(rejected), class_ids, has_split)


def _parse_bool(value: object, line: str) -> bool | Rejected:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "1.0"):
        return True
    if text in ("false", "0", "no", "0.0"):
        return False
    return Rejected(line, "bad is_valid value", f"{line}: {value!r} is not true/false")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p))


def _split_folders(root: Path, layout: FolderLayout) -> tuple[list, list[str]]:
    """[(folder, is_valid)] to list, and notes: the split folders when ``root`` has them."""
    if layout.train_folder is None:  # the top-level folders are the classes, whatever their names
        return [(root, None)], []
    top = {p.name: p for p in _class_folders(root)}
    lower = {name.lower(): name for name in top}
    split_like = {layout.train_folder, layout.valid_folder, *VALID_NAMES, *TEST_NAMES}
    found = sorted(name for name in top if name.lower() in {n.lower() for n in split_like})
    train = top.get(layout.train_folder) or top.get(lower.get(layout.train_folder.lower(), ""))
    if train is None:
        if found:
            raise LayoutError(
                f"{root} has top-level folders named like split folders ({', '.join(found)}) "
                f"but no training folder {layout.train_folder!r}, so they would become classes. "
                "Set ingest.folder.train_folder (and valid_folder) to your folders' names; or, "
                "if these folders are classes, set ingest.folder.train_folder: null (in "
                "conf/<env>/parameters.yml)."
            )
        return [(root, None)], []
    notes = []
    valid_name = next(
        (lower[n.lower()] for n in (layout.valid_folder, *VALID_NAMES) if n.lower() in lower),
        None,
    )
    if valid_name is not None and valid_name != layout.valid_folder:
        notes.append(
            f"validation folder: {valid_name}/ (ingest.folder.valid_folder "
            f"{layout.valid_folder!r} is absent; {valid_name!r} is a usual name for it)"
        )
    # train/ alone: its items get no side (None), and split makes a random split
    sides = [(train, False if valid_name else None)]
    sides += [(top[valid_name], True)] if valid_name else []
    if valid_name is None:
        notes.append(
            f"no validation folder beside {train.name}/ (looked for "
            f"{', '.join(dict.fromkeys((layout.valid_folder, *VALID_NAMES)))}): split at random"
        )
    used = {train.name, valid_name}
    for name in sorted(top):
        if name in used:
            continue
        why = (
            "a test folder is not training data"
            if name.lower() in TEST_NAMES
            else ("not a split folder; classes live under the split folders")
        )
        notes.append(f"left out: {name}/ ({why})")
    return sides, notes


def _list_folders(root: Path, layout: FolderLayout) -> Listing:
    sides, notes = _split_folders(root, layout)
    has_split = any(is_valid for _, is_valid in sides)
    rows, rejected, ignored, names = [], [], [], set()
    for side, is_valid in sides:
        for p in sorted(side.iterdir()):
            if p.is_file() and not _is_hidden(p):
                rejected.append(
                    Rejected(p.relative_to(root).as_posix(), "not in a class folder", "")
                )
        for folder in _class_folders(side):
            names.add(folder.name)
            for f in _files(folder):
                rel = f.relative_to(root).as_posix()
                if any(_is_hidden(Path(part)) for part in f.relative_to(folder).parts):
                    ignored.append(rel)
                    continue
                rows.append((rel, folder.name, is_valid))
    if not names:
        raise LayoutError(
            f"{root} has no class folders; ingest.layout 'folder' expects root/<class>/<image> "
            f"or root/{layout.train_folder}/<class> and root/{layout.valid_folder}/<class>"
        )
    classes = tuple(sorted(names))  # fastai's CategoryMap sorts the vocabulary
    return Listing(
        pd.DataFrame(rows, columns=CANDIDATE_COLUMNS),
        classes,
        tuple(rejected),
        (),
        has_split,
        tuple(ignored),
        tuple(notes),
    )


def _list_regex(root: Path, layout: RegexLayout) -> Listing:
    folder = root / layout.image_dir
    if not folder.is_dir():
        raise LayoutError(f"{folder} does not exist; set ingest.regex.image_dir")
    pattern = layout.regex
    rows, rejected, ignored = [], [], []
    for f in _files(folder):
        rel = f.relative_to(root).as_posix()
        if _is_hidden(f):
            ignored.append(rel)
            continue
        m = pattern.search(f.name)
        if m is None or not m.group(1):
            rejected.append(Rejected(rel, "label pattern did not match", layout.pattern))
            continue
        rows.append((rel, m.group(1), None))
    classes = tuple(sorted({r[1] for r in rows}))
    return Listing(
        pd.DataFrame(rows, columns=CANDIDATE_COLUMNS),
        classes,
        tuple(rejected),
        (),
        False,
        tuple(ignored),
    )
