"""What the options dataclasses of ``vision`` share: bounds, strict keys, and their errors.

Each options dataclass (``AugmentOptions``, ``StageConfig``, ...) states its fields' types and
bounds once, as ``annotated_types`` metadata (``Annotated[int, Ge(1)]``), and forbids unknown
keys through ``__pydantic_config__``: the project validates parameter files against the
dataclasses themselves with ``pydantic.TypeAdapter`` (``cassava_pipeline.params``), without
``vision`` importing pydantic. Checks that tie fields together live in ``__post_init__`` and
raise :class:`OptionError`, which names the field; :func:`check_choices` keeps a ``Literal``
field's choices enforced when a dataclass is built directly in Python.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt

# Unknown keys are errors (a typo such as ``epoch:`` would otherwise be ignored and the default
# silently used): pydantic reads this from a dataclass's ``__pydantic_config__``.
STRICT: dict[str, Any] = {"extra": "forbid"}

PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
Side = Annotated[int, Ge(8)]  # an image side in pixels
Fraction = Annotated[float, Ge(0.0), Le(1.0)]
OpenFraction = Annotated[float, Ge(0.0), Lt(1.0)]  # dropout, smoothing, warp: below 1
PositiveFloat = Annotated[float, Gt(0.0)]
NonNegativeFloat = Annotated[float, Ge(0.0)]

__all__ = [
    "STRICT",
    "Fraction",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenFraction",
    "OptionError",
    "PositiveFloat",
    "PositiveInt",
    "Side",
    "check_choices",
]


class OptionError(ValueError):
    """A field's value that cannot be used: ``field``, ``value`` and the ``reason``.

    ``block`` names the dataclass's place in the parameters (``augment``) for the message of a
    direct construction; a parameter check prints the full key instead.
    """

    def __init__(self, field: str, value: Any, reason: str, block: str = "") -> None:
        self.field, self.value, self.reason = field, value, reason
        where = f"{block}.{field}" if block else field
        super().__init__(f"{where} is {value!r}: {reason}")


def check_choices(obj: Any, block: str = "") -> None:
    """Raise :class:`OptionError` for a ``Literal`` field of dataclass ``obj`` holding another
    value (pydantic checks them when parameters are validated; this covers direct use)."""
    for name, choices in _choices(type(obj)):
        value = getattr(obj, name)
        if value not in choices:
            allowed = " or ".join(repr(c) for c in choices)
            raise OptionError(name, value, f"Input should be {allowed}", block)


@functools.cache
def _choices(kind: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The ``Literal`` fields of dataclass ``kind`` and their values (read once per class: a
    dataclass may be built per batch)."""
    hints = typing.get_type_hints(kind)
    found = ((f.name, _literal_choices(hints[f.name])) for f in dataclasses.fields(kind))
    return tuple((name, choices) for name, choices in found if choices)


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
