"""Bounds a setting declares beside its field: ``lr: Annotated[float, Gt(0)] = 0.01``.

The same names and meaning as the ``annotated-types`` package (Gt, Ge, Lt, Le, Interval, MinLen,
MaxLen, Len), written here so that the stage modules, which declare their settings, import
nothing beyond the standard library and run on a bare GPU machine (torch, torchvision, pyarrow,
numpy and Pillow only). ``config.from_dict`` is the one validator that checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Gt:
    """Greater than ``gt``."""

    gt: Any


@dataclass(frozen=True)
class Ge:
    """Greater than or equal to ``ge``."""

    ge: Any


@dataclass(frozen=True)
class Lt:
    """Less than ``lt``."""

    lt: Any


@dataclass(frozen=True)
class Le:
    """Less than or equal to ``le``."""

    le: Any


@dataclass(frozen=True)
class Interval:
    """Several bounds at once, e.g. ``Interval(ge=0, le=1)``; iterating gives the single bounds."""

    gt: Any = None
    ge: Any = None
    lt: Any = None
    le: Any = None

    def __iter__(self) -> Iterator[Gt | Ge | Lt | Le]:
        for kind, value in ((Gt, self.gt), (Ge, self.ge), (Lt, self.lt), (Le, self.le)):
            if value is not None:
                yield kind(value)


@dataclass(frozen=True)
class MinLen:
    """At least ``min_length`` items (or characters)."""

    min_length: int


@dataclass(frozen=True)
class MaxLen:
    """At most ``max_length`` items (or characters)."""

    max_length: int


@dataclass(frozen=True)
class Len:
    """Between ``min_length`` and ``max_length`` (None: no upper bound) items."""

    min_length: int = 0
    max_length: int | None = None
