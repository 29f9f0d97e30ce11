"""One registry per kind of named thing, and plugin discovery.

Everything frzoo looks up by name (architectures, datasets, algorithms, split presets) lives in a
`Registry`. Plugins add to them with the decorators below; the zoo's own `registry/` folder is a
plugin like any other and uses only this public API.

Plugins are found in three places, in this order:
  1. installed packages that declare an entry point in the group ``frzoo.plugins``;
  2. the ``plugins:`` list of a recipe (module names, or paths to ``.py`` files);
  3. explicit calls to :func:`load_plugin`.
A plugin that fails to import is reported with its name and traceback when something needs it,
and does not break runs that do not.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Generic, Iterable, List, Optional, TypeVar

from .errors import FrzooError

T = TypeVar("T")

ENTRY_POINT_GROUP = "frzoo.plugins"


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """A ' Did you mean ...?' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


class Registry(Generic[T]):
    """Names -> objects of one kind, filled by decorators.

    Registering a name twice is an error unless ``override=True``: a plugin silently replacing
    another's architecture is the kind of bug that costs a week of training.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._origin: Dict[str, str] = {}

    def register(self, name: Optional[str] = None, *, override: bool = False) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name or getattr(obj, "__name__"), obj, override=override)
            return obj
        return deco

    def add(self, name: str, obj: T, *, override: bool = False) -> None:
        origin = getattr(obj, "__module__", "?")
        if name in self._items and not override:
            raise FrzooError(
                f"{self.kind} '{name}' is already registered (by {self._origin[name]}); "
                f"{origin} registers it again. Rename it, or pass override=True to replace it."
            )
        self._items[name] = obj
        self._origin[name] = origin

    def get(self, name: str) -> T:
        load_entry_point_plugins()
        if name not in self._items:
            raise FrzooError(
                f"unknown {self.kind} '{name}'.{suggest(name, self._items)} "
                f"Known: {', '.join(sorted(self._items)) or 'none'}. {self.kind.capitalize()}s come "
                f"from frzoo itself, from installed plugins (entry point group '{ENTRY_POINT_GROUP}') "
                f"and from a recipe's `plugins:` list.{plugin_error_hint()}"
            )
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        load_entry_point_plugins()
        return name in self._items

    def names(self) -> List[str]:
        load_entry_point_plugins()
        return sorted(self._items)

    def origin(self, name: str) -> str:
        return self._origin[name]


ARCHITECTURES: Registry[Callable[..., Any]] = Registry("architecture")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
ALGORITHMS: Registry[Any] = Registry("algorithm")
# Default split points: architecture name -> {K: [points]}.
SPLIT_PRESETS: Registry[Dict[int, List[str]]] = Registry("split preset")


def register_architecture(name: Optional[str] = None, *, override: bool = False,
                          split_presets: Optional[Dict[int, List[str]]] = None) -> Callable:
    """Register a model constructor ``fn(**kwargs) -> nn.Module`` under ``name``.

    The name also becomes known to ``timm.create_model``, so a registered architecture works
    everywhere a timm name works. ``split_presets`` maps K to default split points.
    """
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        arch = name or fn.__name__
        ARCHITECTURES.add(arch, fn, override=override)
        if split_presets:
            SPLIT_PRESETS.add(arch, {int(k): list(v) for k, v in split_presets.items()},
                              override=override)
        _register_with_timm(arch, fn)
        return fn
    return deco


def register_dataset(name: Optional[str] = None, *, override: bool = False) -> Callable:
    """Register a dataset builder; see :mod:`frzoo.data` for the signature it must have."""
    return DATASETS.register(name, override=override)


def register_algorithm(name: Optional[str] = None, *, override: bool = False) -> Callable:
    """Register a per-part algorithm class; see :mod:`frzoo.algorithms`."""
    return ALGORITHMS.register(name, override=override)


def _register_with_timm(arch: str, fn: Callable[..., Any]) -> None:
    try:
        from timm.models import register_model
    except ImportError:  # pragma: no cover - timm is a hard dependency
        return

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> Any:
        if pretrained:
            raise FrzooError(f"architecture '{arch}' has no pretrained weights; use "
                             f"model.init_checkpoint to start from a state_dict.")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return fn(**kwargs)

    entrypoint.__name__ = arch
    entrypoint.__qualname__ = arch
    entrypoint.__module__ = fn.__module__
    entrypoint.__doc__ = fn.__doc__
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm warns when a name is re-registered (override=True)
        register_model(entrypoint)


# ---------------------------------------------------------------- plugin discovery
_entry_points_loaded = False
_loaded: Dict[str, Any] = {}
PLUGIN_ERRORS: Dict[str, str] = {}


def load_entry_point_plugins() -> None:
    """Import every installed plugin once. A broken plugin is recorded, not raised."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            _loaded[ep.value] = ep.load()
        except Exception:  # noqa: BLE001 - reported where it matters, see plugin_error_hint()
            PLUGIN_ERRORS[f"{ep.name} ({ep.value})"] = traceback.format_exc()


def load_plugin(spec: str) -> Any:
    """Import a plugin given as a module name or a path to a ``.py`` file."""
    load_entry_point_plugins()
    if spec in _loaded:
        return _loaded[spec]
    try:
        if spec.endswith(".py") or "/" in spec:
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise FrzooError(f"plugin file '{spec}' does not exist (resolved to {path}).")
            mod_name = f"frzoo_plugin_{path.stem}"
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = module
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except FrzooError:
        raise
    except Exception as exc:
        raise FrzooError(f"plugin '{spec}' failed to import: {type(exc).__name__}: {exc}\n"
                         f"{traceback.format_exc()}") from exc
    _loaded[spec] = module
    return module


def plugin_error_hint() -> str:
    """Text to append to a 'not found' error when some installed plugin failed to import."""
    if not PLUGIN_ERRORS:
        return ""
    return "".join(f"\nNote: plugin {name} failed to import:\n{tb}" for name, tb in PLUGIN_ERRORS.items())
