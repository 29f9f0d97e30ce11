"""The one exception type users see.

Every error frzoo raises on purpose is a `FrzooError` whose message names the bad value, the rule
it breaks and the fix. The CLI prints it on one line (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class FrzooError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class RecipeError(FrzooError):
    """A recipe key is unknown, mistyped or out of range."""


class NonFiniteLossError(FrzooError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""
