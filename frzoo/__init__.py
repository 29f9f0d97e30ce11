"""frzoo: train any timm model split into K parts with Features Replay."""
from .errors import FrzooError, RecipeError
from .plugins import (register_algorithm, register_architecture, register_dataset)

__version__ = "0.1.0"
__all__ = ["FrzooError", "RecipeError", "register_algorithm", "register_architecture",
           "register_dataset", "__version__"]
