"""Parameters as the typed objects the code uses: :func:`parse`, and errors that name the key.

A block of ``conf/*/parameters*.yml`` is validated with pydantic's ``TypeAdapter`` against the
dataclass that states its fields' types, bounds (``annotated_types``) and defaults once
(``vision``'s ``StageConfig``, ``AugmentOptions``, ..., or a node module's own block); unknown
keys are errors. A node calls :func:`parse` on its ``params:`` input;
:func:`cassava_pipeline.params.check_parameters` parses every block at the start of a run.

Nodes take their parameters as dicts and parse them, rather than through Kedro's typed
``params:`` inputs (Kedro 1.x instantiates an annotated dataclass with ``cls(**value)``, leaving
nested blocks as dicts and bounds unchecked, and kedro-mlflow logs a node's ``params:`` inputs by
flattening dicts: objects there would change every MLflow parameter name).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Annotated, Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from cassava_pipeline.vision.options import OptionError

T = TypeVar("T")


class ParameterError(ValueError):
    """Parameters that cannot run: every problem, one line each, and what to do."""


@functools.cache
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind)


def parse(kind: type[T], value: Any) -> T:
    """``value`` (a node's ``params:`` input) as the validated ``kind``; :class:`ParameterError`
    names every problem at once."""
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError as e:
        lines = list(dict.fromkeys(_line(err, kind) for err in e.errors()))
        raise ParameterError(
            "Parameters that cannot run (conf/<env>/parameters*.yml or --params):\n  "
            + "\n  ".join(lines)
            + "\nFix them and run again; conf/base/parameters*.yml says what each key does."
        ) from None


def _block(hint: Any) -> Any:
    """The dataclass inside ``Annotated[...]`` or ``X | None``, or None."""
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), None)
    return hint if dataclasses.is_dataclass(hint) else None


def _fields_at(root: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys of the block at ``loc`` (for the names an unknown key may mean)."""
    kind = root
    for part in loc:
        kind = _block(typing.get_type_hints(kind).get(part)) if kind else None
    return [f.name for f in dataclasses.fields(kind)] if kind else []


def _line(error: dict[str, Any], root: Any) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))
    key = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        names = _fields_at(root, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = f" (known: {', '.join(names)})" if names and not close else ""
        return f"{key}: unknown key{hint}{known}"
    if kind in ("missing", "missing_argument"):
        return f"{key}: missing"
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, OptionError):  # a dataclass's own check names its field
        return f"{'.'.join([*map(str, loc), cause.field])} = {cause.value!r}: {cause.reason}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key} = {error.get('input')!r}: {message}"
