"""One registry per kind of named thing, and plugin discovery.

Everything frzoo looks up by name lives in a :class:`Registry`: architectures, datasets,
algorithms and split presets. Plugins add to them with the decorators below; the zoo's own
``registry/`` folder (the package ``frzoo_registry``) is a plugin like any other and uses only
this public API. See docs/plugins.md.

Plugins are found in three ways:
  1. installed packages that declare an entry point in the group ``frzoo.plugins``
     (:data:`ENTRY_POINT_GROUP`); they are imported, all of them, the first time anything is
     looked up by name;
  2. the ``plugins:`` list of a recipe (module names, or paths to ``.py`` files, relative to the
     working directory), imported before the run builds anything;
  3. explicit calls to :func:`load_plugin` (or a plain ``import``).

Rules:
* Registering a name twice is an error unless the second registration passes ``override=True``;
  so is registering an architecture under a name timm already has.
* A plugin import is all or nothing: when it raises, whatever its own modules registered is
  removed again.
* An installed plugin that fails to import is skipped with a :class:`PluginWarning`, so runs
  that do not need it still work; its name and traceback are kept in :data:`PLUGIN_ERRORS` and
  appended to every "unknown name" error (:func:`plugin_error_hint`). A recipe plugin that fails
  to import stops the run with :class:`PluginImportError` (its name and the original traceback).
* A plugin that stops the process while importing (``sys.exit()``, or argparse refusing a command
  line that is frzoo's) is an import failure like any other, never frzoo's own exit: a recipe
  plugin stops the run with a one-line :class:`PluginImportError` naming it (exit status 2 from
  the CLI), an installed one is skipped with a :class:`PluginWarning`. What it printed to stderr
  while exiting (argparse's usage line, which reads like frzoo's own CLI refusing the command)
  is summarised in that line instead of shown.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import io
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Generic, Iterable, List, Optional, Tuple, TypeVar

from .errors import FrzooError, shorten

T = TypeVar("T")

#: The entry point group installed plugins declare, e.g. in pyproject.toml:
#: ``[project.entry-points."frzoo.plugins"]  my_plugin = "my_package"``.
ENTRY_POINT_GROUP = "frzoo.plugins"

# frzoo's own modules that register built-in names; imported before any installed plugin so that
# a plugin reusing a built-in name fails at its own registration, not frzoo's.
_BUILTIN_MODULES = ("frzoo.data", "frzoo.algorithms")


class PluginImportError(FrzooError):
    """A plugin named in a recipe (or passed to :func:`load_plugin`) raised while importing."""


class PluginWarning(UserWarning):
    """An installed plugin failed to import and was skipped."""


class PluginExit(Exception):
    """A plugin raised SystemExit while importing: it called ``sys.exit()``, or parsed the command
    line (frzoo's) with argparse, which exits on arguments it does not know. Raised in place of
    the SystemExit so that the plugin loader reports it like any failed import."""

    def __init__(self, code: Any, output: str) -> None:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        if any(line.startswith("usage:") for line in lines):
            what = (f"parsed the command line with argparse and exited (status {code!r}; "
                    f"argparse said '{_shorten(lines[-1])}')")
        else:
            what = f"called sys.exit({code!r})"
        super().__init__(f"it {what} while importing; a plugin must only define and register "
                         f"things when imported. Move the code that exits (command-line "
                         f"parsing, a script's main) under `if __name__ == \"__main__\":`.")
        self.code = code


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _exits_as_error(do_import: Callable[[], Any]) -> Any:
    """Run a plugin's import with its stderr held back: a SystemExit becomes :class:`PluginExit`
    (what it printed goes into that message, not onto the screen); otherwise the held-back text
    is written out as it would have been."""
    held = io.StringIO()
    exited = False
    try:
        with contextlib.redirect_stderr(held):
            return do_import()
    except SystemExit as exc:
        exited = True
        raise PluginExit(exc.code, held.getvalue()) from None
    finally:
        if not exited and held.getvalue():
            sys.stderr.write(held.getvalue())


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """A ' Did you mean ...?' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(name[:200], list(choices), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def where_names_come_from(kind_plural: str) -> str:
    return (f"{kind_plural} come from frzoo itself, from installed plugins (entry point group "
            f"'{ENTRY_POINT_GROUP}'; the zoo, package frzoo_registry in registry/, is one) and from a recipe's `plugins:` "
            f"list (module names or .py files); see docs/plugins.md.")


# While a plugin imports, every registration is journaled so that a failed import can be undone:
# (module that registered, undo function); architectures reach timm only once it succeeded.
_journal: List[Tuple[str, Callable[[], None]]] = []
_timm_pending: List[Tuple[str, str, Callable[..., Any]]] = []  # (origin, name, builder)
_import_depth = 0


class Registry(Generic[T]):
    """Names -> objects of one kind, filled by decorators.

    Registering a name twice is an error unless ``override=True``: a plugin silently replacing
    another's architecture is the kind of bug that costs a week of training.
    """

    def __init__(self, kind: str, plural: Optional[str] = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._items: Dict[str, T] = {}
        self._origin: Dict[str, str] = {}

    def register(self, name: Optional[str] = None, *, override: bool = False) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name or getattr(obj, "__name__"), obj, override=override)
            return obj
        return deco

    def check_free(self, name: str, origin: str, *, override: bool = False) -> None:
        """Raise unless ``name`` may be registered by ``origin``."""
        if not isinstance(name, str) or not name:
            raise FrzooError(f"{self.kind} names must be non-empty strings, got {name!r} "
                             f"(from {origin}).")
        if name in self._items and not override:
            raise FrzooError(
                f"{self.kind} '{name}' is already registered (by {self._origin[name]}); "
                f"{origin} registers it again. Rename it, or pass override=True to replace it.")

    def add(self, name: str, obj: T, *, override: bool = False,
            origin: Optional[str] = None) -> None:
        """Register ``obj`` as ``name``. ``origin`` (the registering module) defaults to
        ``obj.__module__``."""
        origin = origin or getattr(obj, "__module__", None) or _caller_module(1)
        self.check_free(name, origin, override=override)
        previous = (self._items[name], self._origin[name]) if name in self._items else None
        self._items[name] = obj
        self._origin[name] = origin
        _record(origin, lambda: self._restore(name, previous))

    def _restore(self, name: str, previous: Optional[Tuple[T, str]]) -> None:
        if previous is None:
            self._items.pop(name, None)
            self._origin.pop(name, None)
        else:
            self._items[name], self._origin[name] = previous

    def get(self, name: str) -> T:
        load_entry_point_plugins()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise FrzooError(
                f"unknown {self.kind} {shorten(name)}.{suggest(name, self._items)} Known: {known}. "
                f"{where_names_come_from(self.plural.capitalize())}{plugin_error_hint()}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        load_entry_point_plugins()
        return name in self._items

    def names(self) -> List[str]:
        load_entry_point_plugins()
        return sorted(self._items)

    def origin(self, name: str) -> str:
        """The module that registered ``name``."""
        return self._origin[name]


ARCHITECTURES: Registry[Callable[..., Any]] = Registry("architecture")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
ALGORITHMS: Registry[Any] = Registry("algorithm")
# Default split points: architecture name (registered here or a timm name) -> {K: [points]}.
SPLIT_PRESETS: Registry[Dict[int, List[str]]] = Registry("split preset")


def register_architecture(name: Optional[str] = None, *, override: bool = False,
                          split_presets: Optional[Dict[int, List[str]]] = None) -> Callable:
    """Register a model constructor ``fn(**kwargs) -> nn.Module`` under ``name``.

    The name also becomes known to ``timm.create_model``, so a registered architecture works
    everywhere a timm name works. ``split_presets`` maps K to its K-1 default split points (the
    modules that start parts 2..K). A name timm already has is refused unless ``override=True``.
    """
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        arch = name or fn.__name__
        origin = getattr(fn, "__module__", None) or _caller_module(1)
        # Check everything before changing anything: a refused registration leaves no trace.
        ARCHITECTURES.check_free(arch, origin, override=override)
        presets = _check_presets(arch, split_presets, origin) if split_presets else None
        if presets is not None:
            SPLIT_PRESETS.check_free(arch, origin, override=override)
        _check_timm_free(arch, origin, override=override)
        ARCHITECTURES.add(arch, fn, override=override, origin=origin)
        if presets is not None:
            SPLIT_PRESETS.add(arch, presets, override=override, origin=origin)
        _register_with_timm(arch, fn, origin)
        return fn
    return deco


def register_split_presets(arch: str, presets: Dict[int, List[str]], *,
                           override: bool = False) -> None:
    """Default split points for ``arch`` (a registered architecture or any timm name), by K."""
    origin = _caller_module(1)
    checked = _check_presets(arch, presets, origin)
    SPLIT_PRESETS.add(arch, checked, override=override, origin=origin)


def register_dataset(name: Optional[str] = None, *, override: bool = False) -> Callable:
    """Register a dataset builder; see :mod:`frzoo.data` for the signature it must have."""
    return DATASETS.register(name, override=override)


def register_algorithm(name: Optional[str] = None, *, override: bool = False) -> Callable:
    """Register a per-part algorithm class; see :mod:`frzoo.algorithms.base`."""
    return ALGORITHMS.register(name, override=override)


def _caller_module(depth: int) -> str:
    """The module of the code ``depth`` calls above the function that calls this one."""
    try:
        return str(sys._getframe(depth + 1).f_globals.get("__name__", "?"))
    except ValueError:  # pragma: no cover - stack shallower than expected
        return "?"


def _check_presets(arch: str, presets: Dict[int, List[str]],
                   origin: str) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for k, points in dict(presets).items():
        points = list(points)
        if isinstance(k, bool) or int(k) != k or int(k) < 1 or len(points) != int(k) - 1 \
                or not all(isinstance(p, str) and p for p in points):
            raise FrzooError(
                f"split preset of '{arch}' for K={k!r} (from {origin}) is {points!r}; a K-part "
                f"preset is a list of K-1 module names, the modules that start parts 2..K.")
        out[int(k)] = points
    return out


# ---------------------------------------------------------------- timm
def _check_timm_free(arch: str, origin: str, *, override: bool) -> None:
    import timm
    if timm.is_model(arch) and arch not in ARCHITECTURES._items and not override:
        raise FrzooError(
            f"architecture '{arch}' (from {origin}) is already a timm model; registering it would "
            f"replace timm's. Rename it, or pass override=True to replace timm's in this process.")


def _register_with_timm(arch: str, fn: Callable[..., Any], origin: str) -> None:
    """Make ``arch`` known to ``timm.create_model`` through timm's public ``register_model``.

    During a plugin's import this waits until the import has succeeded (see
    :func:`_import_atomically`), so a plugin that fails leaves nothing in timm to take back.
    """
    if _import_depth:
        _timm_pending.append((origin, arch, fn))
        return
    from timm.models import register_model

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> Any:
        if pretrained:
            raise FrzooError(f"architecture '{arch}' has no pretrained weights; use "
                             f"model.init_checkpoint to start from a state_dict.")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return fn(**kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = arch
    entrypoint.__module__, entrypoint.__doc__ = fn.__module__, fn.__doc__
    module = sys.modules.get(entrypoint.__module__)
    # timm appends the name to the module's __all__; the plugin module has no attribute of that
    # name (the entrypoint lives here), so `from module import *` would break. Restore it.
    had_all = module is not None and hasattr(module, "__all__")
    saved = list(module.__all__) if had_all else None  # a copy: timm appends in place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm warns when a name is re-registered (override=True)
        register_model(entrypoint)
    if module is not None:
        if had_all:
            module.__all__ = saved
        elif hasattr(module, "__all__"):
            del module.__all__


# ---------------------------------------------------------------- plugin discovery
_entry_points_loaded = False
_loaded: Dict[str, Any] = {}  # module name or resolved .py path -> module
#: Installed plugins that failed to import: "'name' = value (distribution X)" -> traceback.
PLUGIN_ERRORS: Dict[str, str] = {}


def _record(origin: str, undo: Callable[[], None]) -> None:
    if _import_depth:
        _journal.append((origin, undo))


def _owner_package(module: str) -> str:
    """The modules a failed import of ``module`` may take down: its top-level package (just the
    module itself inside frzoo, whose other modules are never rolled back)."""
    top = module.split(".")[0]
    return module if top == "frzoo" else top


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _import_atomically(module_name: str, do_import: Callable[[], Any]) -> Any:
    """Run ``do_import``; if it raises, undo what the plugin's own, newly imported modules
    registered and forget those modules, so that nothing half-registered stays behind and a
    later import starts clean."""
    global _import_depth
    package = _owner_package(module_name)
    before = set(sys.modules)
    mark = len(_journal)
    _import_depth += 1
    try:
        return _exits_as_error(do_import)
    except BaseException:
        def failed(mod: str) -> bool:
            return _in_package(mod, package) and mod not in before
        kept = []
        for origin, undo in reversed(_journal[mark:]):
            if failed(origin):
                undo()
            else:
                kept.append((origin, undo))
        _journal[mark:] = reversed(kept)
        for mod in [m for m in sys.modules if failed(m)]:
            del sys.modules[mod]
        _timm_pending[:] = [entry for entry in _timm_pending if not failed(entry[0])]
        raise
    finally:
        _import_depth -= 1
        if not _import_depth:
            _journal.clear()
            pending, _timm_pending[:] = list(_timm_pending), []
            for origin, arch, fn in pending:
                _register_with_timm(arch, fn, origin)


def load_entry_point_plugins() -> None:
    """Import every installed plugin once. A broken plugin is recorded and warned about, not
    raised: runs that do not need it go on."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _loaded:
            continue
        try:
            _loaded[ep.value] = _import_atomically(ep.module, ep.load)
        except Exception as exc:  # noqa: BLE001 - see plugin_error_hint()
            dist = getattr(getattr(ep, "dist", None), "name", None)
            label = f"'{ep.name}' = {ep.value}" + (f" (distribution {dist})" if dist else "")
            PLUGIN_ERRORS[label] = _plugin_traceback(exc)
            warnings.warn(
                f"frzoo plugin {label} failed to import and is skipped "
                f"({type(exc).__name__}: {_first_line(exc)}). Runs that need what it registers "
                f"fail with its traceback.", PluginWarning, stacklevel=3)


def load_plugin(spec: str) -> Any:
    """Import a plugin given as a module name or a path to a ``.py`` file (once)."""
    load_entry_point_plugins()
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        return _load_file(spec)
    if spec in _loaded:
        return _loaded[spec]
    try:
        module = _import_atomically(spec, lambda: importlib.import_module(spec))
    except ModuleNotFoundError as exc:
        if exc.name is not None and _in_package(spec, exc.name):
            raise PluginImportError(
                f"plugin '{spec}' is not an importable module ({exc}). Install the package that "
                f"provides it, or give the path to a .py file.") from None
        raise _import_error(spec, exc) from exc
    except Exception as exc:  # noqa: BLE001 - any error of plugin code is reported the same way
        raise _import_error(spec, exc) from exc
    _loaded[spec] = module
    return module


def _load_file(spec: str) -> Any:
    path = Path(spec).expanduser().resolve()
    key = str(path)
    if key in _loaded:
        return _loaded[key]
    if not path.is_file():
        raise PluginImportError(f"plugin file '{spec}' does not exist (resolved to {path}; "
                                f"relative paths are relative to the working directory).")
    mod_name = f"frzoo_plugin_{''.join(c if c.isalnum() else '_' for c in path.stem)}"
    if mod_name in sys.modules:  # another file with the same stem: keep both apart
        mod_name += f"_{len(_loaded)}"
    file_spec = importlib.util.spec_from_file_location(mod_name, path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)

    def execute() -> Any:
        sys.modules[mod_name] = module
        file_spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    try:
        _import_atomically(mod_name, execute)
    except Exception as exc:  # noqa: BLE001
        raise _import_error(spec, exc) from exc
    _loaded[key] = module
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _plugin_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` from the plugin's first frame on (frzoo's and importlib's
    frames that merely started the import are left out)."""
    machinery = (str(Path(__file__)), str(Path(importlib.__file__).parent))
    tb = exc.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename.startswith(machinery)
                              or tb.tb_frame.f_code.co_filename.startswith("<frozen importlib")):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _import_error(spec: str, exc: BaseException) -> PluginImportError:
    if isinstance(exc, PluginExit):  # its traceback is the exit call: one line says it all
        return PluginImportError(f"plugin '{spec}' failed to import: {exc}")
    return PluginImportError(
        f"plugin '{spec}' failed to import: {type(exc).__name__}: {_first_line(exc)}\n"
        f"Original traceback:\n{_plugin_traceback(exc).rstrip()}")


def plugin_error_hint() -> str:
    """Text to append to a 'not found' error when some installed plugin failed to import."""
    if not PLUGIN_ERRORS:
        return ""
    return "".join(f"\nNote: installed plugin {name} failed to import, so nothing it registers "
                   f"is available:\n{tb.rstrip()}" for name, tb in PLUGIN_ERRORS.items())

