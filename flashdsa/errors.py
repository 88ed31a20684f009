"""Exceptions of flashdsa's public surface that carry a meaning for the ``flashdsa`` command."""


class UsageError(ValueError):
    """A mistake of the caller (a flag or argument that contradicts another, or a state the
    request cannot apply to), as opposed to a failure inside flashdsa.

    The ``flashdsa`` command reports it as one line, ``flashdsa <command>: error: <message>``,
    and exits with status 2 (``--debug`` shows the traceback instead). It is a ``ValueError``,
    so library callers catching ``ValueError`` keep working. The message names the flag or
    argument and what was expected."""
