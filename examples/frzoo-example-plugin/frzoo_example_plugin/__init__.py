"""An example frzoo plugin (see docs/plugins.md).

Importing the package registers everything: frzoo imports it through the ``frzoo.plugins`` entry
point declared in pyproject.toml, so users never import it themselves.
"""
from . import data, models  # noqa: F401  (registration happens at import)
