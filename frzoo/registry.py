"""Deprecated name of :mod:`frzoo.plugins` (the registries and plugin discovery), kept for one
release so that plugins written against ``frzoo.registry`` keep working. The module was renamed
so that ``registry/``, the zoo's folder, is the only thing in the project called "registry"."""
from __future__ import annotations

import sys
import warnings

from . import plugins

warnings.warn("frzoo.registry is now frzoo.plugins (same names); import from frzoo.plugins. "
              "frzoo.registry will be removed in the next release.", FutureWarning, stacklevel=2)
sys.modules[__name__] = plugins  # the same module object: state and monkeypatches are shared
