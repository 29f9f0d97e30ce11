"""Deprecated name of the zoo (``frzoo_registry``, the ``registry/`` folder), kept for one
release: ``import frzoo_zoo`` and ``frzoo_zoo.cifar_resnet`` still work, with a warning."""
from __future__ import annotations

import sys
import warnings

import frzoo_registry
from frzoo_registry import cifar_resnet, model_table, split_rule, timm_presets

for _module in (cifar_resnet, model_table, split_rule, timm_presets):
    sys.modules[f"{__name__}.{_module.__name__.rpartition('.')[2]}"] = _module

warnings.warn("the zoo's package frzoo_zoo is now frzoo_registry (same modules); frzoo_zoo "
              "will be removed in the next release.", FutureWarning, stacklevel=2)
