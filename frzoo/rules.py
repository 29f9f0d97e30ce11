"""Value rules written beside the fields they check: what a recipe value must be beyond its type.

The recipe's sections (frzoo.config) and each algorithm's ``Options`` are dataclasses that
OmegaConf checks for types and choices. What a type cannot say, a field states with its default::

    batch_size: int = positive(128)
    momentum: float = at_least(0.0, 0.9)
    master_port: int = between(0, 65535, 0, note="0: pick a free port")

and the dataclass checks its own fields in ``__post_init__`` with :func:`check_fields`, which also
refuses every float that is not finite (NaN, inf), in lists too. OmegaConf builds the dataclasses
once the layers are merged (``OmegaConf.to_object``), so the rules run on the final values, and a
bad one is a RecipeError naming the key, the value and the rule: ``data.batch_size=0 must be
positive.`` Rules that tie several fields sit in the same ``__post_init__`` after it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import RecipeError, shorten


@dataclass(frozen=True)
class Range:
    """low <= value <= high (strictly where `open_low` / `open_high`); None: no bound."""
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""

    def holds(self, value: Any) -> bool:
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or value < self.high or (value == self.high and not self.open_high)

    def describe(self) -> str:
        if self.high is None:
            text = "positive" if self.open_low and self.low == 0 else \
                "zero or more" if self.low == 0 else \
                f"more than {self.low}" if self.open_low else f"at least {self.low}"
        elif self.low is None:
            text = f"at most {self.high}"
        else:
            low = f"more than {self.low}" if self.open_low else f"at least {self.low}"
            high = f"below {self.high}" if self.open_high else f"at most {self.high}"
            text = f"{low} and {high}" if self.open_low or self.open_high else \
                f"between {self.low} and {self.high}"
        return f"{text} ({self.note})" if self.note else text


def ranged(default: Any, rule: Range) -> Any:
    """A dataclass field with `default` whose value (each entry of a list) must satisfy `rule`;
    None always passes (Optional fields)."""
    if isinstance(default, list):  # a mutable default: each instance gets its own copy
        return field(default_factory=lambda: list(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def positive(default: Any) -> Any:
    return ranged(default, Range(low=0, open_low=True))


def at_least(low: float, default: Any, note: str = "") -> Any:
    return ranged(default, Range(low=low, note=note))


def between(low: float, high: float, default: Any, note: str = "", *,
            open_high: bool = False) -> Any:
    return ranged(default, Range(low=low, high=high, open_high=open_high, note=note))


def check_fields(obj: Any, path: str) -> None:
    """Every field of the dataclass `obj` (the section at dotted `path`) against its rule; every
    float finite. Nested dataclasses check themselves when they are built."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None or dataclasses.is_dataclass(value):
            continue
        key = f"{path}.{f.name}" if path else f.name
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise RecipeError(f"{key}={shorten(value)} must be finite (not nan or inf).")
        rule: Optional[Range] = f.metadata.get("rule")
        if rule is not None and not all(rule.holds(v) for v in numbers):
            each = " (every entry)" if isinstance(value, (list, tuple)) else ""
            raise RecipeError(f"{key}={shorten(value)} must be {rule.describe()}{each}.")


__all__ = ["Range", "ranged", "positive", "at_least", "between", "check_fields"]
