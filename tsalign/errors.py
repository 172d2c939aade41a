"""The one exception type the CLI turns into a single line on stderr (exit 2) instead of a traceback."""


class TsalignError(Exception):
    """A user-facing error: the message says what is wrong and what to set or run instead."""
