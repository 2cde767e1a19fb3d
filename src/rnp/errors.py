"""The one exception type that reaches users as a one-line message.

Anything the user can cause (a wrong path, a corrupt or unsafe file, a class count that does
not match, a clean set that is too small) raises :class:`RnpError`. The CLI prints its message
on one line and exits non-zero; any other exception is a bug and keeps its traceback.
"""


class RnpError(Exception):
    """A problem with the user's input, reported without a traceback."""
