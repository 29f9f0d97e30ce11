"""Who runs the parts: `local` (one process) here; the transport between parts lives here."""
from .local import LocalExecutor

__all__ = ["LocalExecutor"]
