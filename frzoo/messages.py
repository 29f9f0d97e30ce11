"""frzoo's messages to the person running it: one logger, ``logging.getLogger("frzoo")``.

Library code only logs (``log.info(...)``, ``log.warning(...)``) and never configures logging;
the command line decides, once, how the messages appear (:func:`show_on_stderr`: ``frzoo:
message`` on stderr), and the launcher of a distributed job asks its spawned workers to show
them the same way (:func:`shown_on_stderr`). An application that imports frzoo sees them through
its own logging configuration.
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("frzoo")


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a message is written (a test that
    captures stderr replaces it after the handler exists)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("frzoo: %(message)s"))

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - logging.StreamHandler's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it
        pass


def show_on_stderr() -> None:
    """Show frzoo's messages (info and above) as ``frzoo: message`` on stderr; once per process,
    however often it is called."""
    if not shown_on_stderr():
        log.addHandler(_Stderr())
    log.setLevel(logging.INFO)


def shown_on_stderr() -> bool:
    return any(isinstance(h, _Stderr) for h in log.handlers)
