"""The zoo: frzoo's own plugin (architectures, split presets), written against the public API."""

from . import cifar_resnet  # noqa: F401  (registers the cifar_resnet* architectures)
from . import timm_presets  # noqa: F401,E402  (registers split presets for timm models)
