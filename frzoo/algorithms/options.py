"""The options an algorithm takes: the keys of the recipe's `algorithm:` section besides `name`.

The section is open (any key passes the recipe schema) because plugins add algorithms with
options of their own; the algorithm CLASS is the schema. Each class declares its options as a
frozen dataclass named ``Options``, typed like every other recipe section (frzoo.config): one
field per option, its annotation the rule (anything OmegaConf types: ``Literal[...]`` for a
choice, ``bool``, ``int``, ``float``, ``str``, ``Optional``/``Union`` of those, lists, dicts,
``Any``) and its default what a recipe that says nothing gets::

    @dataclass(frozen=True)
    class Options:
        warmup: Literal["skip", "zeros"] = "skip"
        max_norm: float = positive(1.0)     # frzoo.rules: a range beside the field

A rule types cannot say goes in ``__post_init__``, raising ValueError with the message. A
subclass inherits its parent's ``Options`` and extends it by subclassing it.

:func:`parse_options` checks a section against the class with OmegaConf (the same merge every
recipe section goes through), once, when the run is built, before anything trains.

Switching algorithms on one recipe (``algorithm.name=bp`` on a recipe written for fr, or a sweep
over ``algorithm.name``): :func:`own_options` sets aside the options that another REGISTERED
algorithm declares (fr's ``warmup`` under bp), for the caller to name in a one-line note; an
option that no registered algorithm declares is still an error, with a suggestion.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Mapping, Optional, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import (ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                              ValidationError)

from ..errors import RecipeError, shorten
from ..rules import check_fields

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


def _who(cls: type, name: Optional[str]) -> str:
    return f"algorithm '{name}' ({cls.__name__})" if name else f"algorithm class {cls.__name__}"


def parse_options(cls: type, given: Mapping[str, Any], name: Optional[str] = None) -> Any:
    """``cls.Options`` built from `given` (plain values) by OmegaConf, or a RecipeError naming
    the option, the algorithm and its class, and the valid values.

    `name` is the algorithm's registered name, for the messages (``algorithm 'fr'``)."""
    who = _who(cls, name)
    declared = declared_options(cls)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Options),  # type: ignore[attr-defined]
                                 dict(given))
        options = OmegaConf.to_object(merged)
        check_fields(options, "algorithm")
    except ConfigKeyError as exc:
        raise RecipeError(_not_taken(cls, name, str(exc.key), None)) from None
    except MissingMandatoryValue as exc:
        key = str(exc.full_key)
        raise RecipeError(f"{who} needs the option algorithm.{key} "
                          f"({_rule(declared[key][0])}).") from None
    except ValidationError as exc:
        key = str(exc.full_key)
        raise RecipeError(_bad_value(who, key, given.get(key), declared[key][0])) from None
    except RecipeError as exc:  # a range or a non-finite float (frzoo.rules)
        raise RecipeError(f"{str(exc).rstrip('.')} ({who}).") from None
    except OmegaConfBaseException as exc:  # an annotation OmegaConf cannot type: the class's bug
        raise TypeError(f"{who}: its Options cannot be typed by OmegaConf: "
                        f"{str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # a rule of the class's own __post_init__
        raise RecipeError(f"{who}: {exc}") from None
    return options


def own_options(cls: type, given: Mapping[str, Any], name: str,
                registered: Mapping[str, type]) -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
    """(the options of `given` that `cls` takes, {option another registered algorithm takes:
    the names of those algorithms}). An option that none of `registered` takes is a RecipeError
    with the closest one; so a recipe written for one algorithm runs under another, and a
    misspelled option is still refused."""
    mine = declared_options(cls)
    owners: Dict[str, List[str]] = {}
    for other, other_cls in registered.items():
        if other == name or not dataclasses.is_dataclass(getattr(other_cls, "Options", None)):
            continue
        for option in declared_options(other_cls):
            owners.setdefault(option, []).append(other)
    own, ignored = {}, {}
    for key, value in given.items():
        if key in mine:
            own[key] = value
        elif key in owners:
            ignored[key] = sorted(owners[key])
        else:
            raise RecipeError(_not_taken(cls, name, str(key), owners))
    return own, ignored


def ignored_note(cls: type, name: str, ignored: Mapping[str, List[str]]) -> str:
    """One line naming the options `name` ignores and the algorithms they belong to."""
    listed = "; ".join(f"algorithm.{key} (of {', '.join(owners)})"
                       for key, owners in ignored.items())
    return (f"{_who(cls, name)} ignores options of other algorithms: {listed}. Its options: "
            f"{describe_options(cls)}.")


def _not_taken(cls: type, name: Optional[str], key: str,
               owners: Optional[Mapping[str, List[str]]]) -> str:
    """`owners`: the other registered algorithms' options, when they were looked at too."""
    shown = shorten(key)
    close = difflib.get_close_matches(key[:200], list(declared_options(cls)), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    if not close and owners:
        close = difflib.get_close_matches(key[:200], list(owners), n=1)
        hint = (f" Did you mean '{close[0]}' (an option of {', '.join(sorted(owners[close[0]]))})?"
                if close else "")
    nor = "" if owners is None else " No other registered algorithm takes it either."
    return (f"{_who(cls, name)} takes no option {shown}; its options: {describe_options(cls)}."
            f"{hint}{nor} Remove algorithm.{shorten(key, quote=False)} from the recipe (or its "
            f"`_base_` or overrides, or add ~algorithm.{shorten(key, quote=False)} to the "
            f"command line).")


def _bad_value(who: str, key: str, value: Any, hint: Any) -> str:
    choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
    if choices is not None:
        close = difflib.get_close_matches(str(value)[:200], [str(c) for c in choices], n=1)
        suggestion = f" Did you mean '{close[0]}'?" if close else ""
        return (f"algorithm.{key}={shorten(value)} is not one of "
                f"{', '.join(map(str, choices))} ({who}).{suggestion}")
    return f"algorithm.{key}={shorten(value)} must be of type {_rule(hint)} ({who})."


def _rule(hint: Any) -> str:
    """An annotation as a message says it: `skip|zeros`, `float`, `int or null`."""
    if typing.get_origin(hint) is typing.Literal:
        return "|".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) is typing.Union:
        return " or ".join("null" if a is type(None) else _rule(a) for a in typing.get_args(hint))
    if hint is Any:
        return "any value"
    return getattr(hint, "__name__", str(hint))


__all__ = ["declared_options", "describe_options", "parse_options", "own_options",
           "ignored_note"]
