"""Ranges of numeric settings, declared once with the field or the CLI option that holds them.

Why: a negative checkpoint interval or learning rate is accepted by the types and only
misbehaves later (a checkpoint every step, a silently clamped shot count). Every int/float
field of a config dataclass the loader fills carries ``metadata={"range": Range}`` (made by
:func:`ranged` or :func:`unbounded`); :mod:`megatron_cpt.config_loader` refuses a value
outside it with ``file:line`` (or the command-line argument that set it), and
tests/test_config_ranges.py fails on a numeric field that declares none. CLI options use
:func:`arg_range` and are refused the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import MISSING, dataclass
from typing import Any

from megatron_cpt.errors import UsageError


@dataclass(frozen=True)
class Range:
    """``lo <= v <= hi`` (``<`` where open); ``None`` is no bound on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        """'> 0', '>= 1', 'in [0, 1)', or 'any number'."""
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any number"

    def check(self, value: Any, what: str) -> None:
        """Raise UsageError ``what must be <range>, got <value>`` (lists: every item)."""
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not self.contains(v):
                raise UsageError(f"{what} must be {self.describe()}, got "
                                 f"{format(v, 'g') if isinstance(v, float) else v}")


UNBOUNDED = Range()


def ranged(default: Any = MISSING, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False, **kw) -> Any:
    """A dataclass field whose numeric value must lie in the range (None values pass)."""
    return dataclasses.field(default=default, metadata={"range": Range(lo, hi, lo_open, hi_open)},
                             **kw)


def unbounded(default: Any = MISSING, **kw) -> Any:
    """A numeric field that accepts any value, said explicitly (the range test requires it)."""
    return dataclasses.field(default=default, metadata={"range": UNBOUNDED}, **kw)


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get("range")


def check_instance(obj: Any, where: str = "", prefix: str = "") -> None:
    """Check every ranged field of a dataclass built without the loader (``cls(**raw)``)."""
    for f in dataclasses.fields(obj):
        r = field_range(f)
        value = getattr(obj, f.name)
        if r is not None and value is not None:
            try:
                r.check(value, f"{prefix}{f.name}")
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}" if where else str(exc)) from None


class _InRange(argparse.Action):
    """Stores a converted option value after checking its range (UsageError: one line, exit 2)."""

    def __init__(self, *args, bounds: Range, **kw):
        self.bounds = bounds
        super().__init__(*args, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        self.bounds.check(values, f"{option_string or self.dest}")
        setattr(namespace, self.dest, values)


def arg_range(kind: type, lo: float | None = None, hi: float | None = None, *,
              lo_open: bool = False, hi_open: bool = False) -> dict:
    """``add_argument`` keywords for a numeric option with a range:
    ``p.add_argument("--num-fewshot", **arg_range(int, 0), default=5)``."""
    return {"type": kind, "action": _InRange, "bounds": Range(lo, hi, lo_open, hi_open)}
