"""The one exception type users see: the CLI prints its message and exits non-zero."""


class QuantkitError(Exception):
    """A problem with the user's input or environment, with what to do next in the message."""
