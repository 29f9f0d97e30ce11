"""The options an algorithm takes: the keys of the recipe's `algorithm:` section besides `name`.

The section is open (any key passes the recipe schema) because plugins add algorithms with
options of their own; the algorithm CLASS is the schema. Each class declares its options as a
frozen dataclass named ``Options``: one field per option, its annotation the rule and its default
what a recipe that says nothing gets::

    @dataclass(frozen=True)
    class Options:
        warmup: Literal["skip", "zeros"] = "skip"
        max_norm: float = 1.0

Annotations understood: ``Literal[...]`` (a choice), ``bool``, ``int``, ``float`` (an int is
taken), ``str``, ``Optional[...]``/unions of those, and any class (an isinstance check);
``Any`` takes anything. A rule types cannot say goes in ``__post_init__``, raising ValueError
with the message. A subclass inherits its parent's ``Options`` and extends it by subclassing it.

:func:`parse_options` checks a section against the class once, when the run is built, before
anything trains: an option the class does not declare is an error naming the class and the
options it takes (never silently dropped), and a bad value names the option, the value and the
valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import RecipeError

_NO_VALUE = object()


def declared_options(cls: type) -> Dict[str, Tuple[Any, Any]]:
    """{option: (type annotation, default)} of an algorithm class, in declaration order."""
    options = getattr(cls, "Options", None)
    if options is None or not dataclasses.is_dataclass(options):
        raise TypeError(f"algorithm class {cls.__name__} must declare its options as a dataclass "
                        f"named Options (an empty one when it takes none); see "
                        f"frzoo/algorithms/options.py.")
    hints = typing.get_type_hints(options)
    out = {}
    for f in dataclasses.fields(options):
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else
                   _NO_VALUE)
        out[f.name] = (hints.get(f.name, Any), default)
    return out


def describe_options(cls: type) -> str:
    """`warmup (skip|zeros, default skip), max_norm (float, default 1.0)`, or `none`."""
    parts = []
    for name, (hint, default) in declared_options(cls).items():
        rule = _rule(hint)
        parts.append(f"{name} ({rule}, required)" if default is _NO_VALUE else
                     f"{name} ({rule}, default {default})")
    return ", ".join(parts) or "none"


def parse_options(cls: type, given: Mapping[str, Any], name: Optional[str] = None) -> Any:
    """``cls.Options`` built from `given` (plain values), or a RecipeError naming the problem.

    `name` is the algorithm's registered name, for the messages (``algorithm 'fr'``)."""
    who = f"algorithm '{name}' ({cls.__name__})" if name else f"algorithm class {cls.__name__}"
    declared = declared_options(cls)
    unknown = [key for key in given if key not in declared]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(declared), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"{who} takes no option '{key}'; its options: "
                          f"{describe_options(cls)}.{hint} Remove algorithm.{key} from the "
                          f"recipe (or its `_base_` or overrides).")
    values = {}
    for key, (hint, default) in declared.items():
        if key not in given:
            if default is _NO_VALUE:
                raise RecipeError(f"{who} needs the option algorithm.{key} ({_rule(hint)}).")
            continue
        ok, value = _conform(given[key], hint)
        if not ok:
            choices = _choices(hint)
            if choices is not None:
                close = difflib.get_close_matches(str(given[key]), [str(c) for c in choices], n=1)
                hint_text = f" Did you mean '{close[0]}'?" if close else ""
                raise RecipeError(f"algorithm.{key}={given[key]!r} is not one of "
                                  f"{', '.join(map(str, choices))} ({who}).{hint_text}")
            raise RecipeError(f"algorithm.{key}={given[key]!r} must be of type {_rule(hint)} "
                              f"({who}).")
        values[key] = value
    try:
        return cls.Options(**values)  # type: ignore[attr-defined]
    except ValueError as exc:  # a rule of the class's own __post_init__
        raise RecipeError(f"{who}: {exc}") from None


# ---------------------------------------------------------------- annotations
def _choices(hint: Any) -> Optional[Tuple[Any, ...]]:
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def _rule(hint: Any) -> str:
    choices = _choices(hint)
    if choices is not None:
        return "|".join(map(str, choices))
    if typing.get_origin(hint) is typing.Union:
        return " or ".join("null" if a is type(None) else _rule(a) for a in typing.get_args(hint))
    if hint is Any:
        return "any value"
    return getattr(hint, "__name__", str(hint))


def _conform(value: Any, hint: Any) -> Tuple[bool, Any]:
    """(whether `value` fits the annotation, the value as the option holds it)."""
    if hint is Any:
        return True, value
    choices = _choices(hint)
    if choices is not None:  # compare types too: True must not pass for 1, nor 1 for True
        return any(type(value) is type(c) and value == c for c in choices), value
    if typing.get_origin(hint) is typing.Union:
        for arm in typing.get_args(hint):
            ok, conformed = _conform(value, arm)
            if ok:
                return True, conformed
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    origin = typing.get_origin(hint) or hint
    return (isinstance(value, origin) if isinstance(origin, type) else True), value


__all__ = ["declared_options", "describe_options", "parse_options"]
