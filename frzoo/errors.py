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


def shorten(value: object, limit: int = 80, *, quote: bool = True) -> str:
    """`value` as a message shows it (``repr`` of a string unless not `quote`, ``str`` of anything
    else), cut in the middle to about `limit` characters with the length it had: a recipe value
    can be megabytes (a pasted file as ``model.name``) and a message must stay one short line."""
    text = repr(value) if isinstance(value, str) and quote else str(value)
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 10, 4)
    return f"{text[:keep]}...{text[-keep:]} ({len(text)} characters)"
