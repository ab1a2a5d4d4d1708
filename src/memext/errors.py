"""The one exception type a user can act on: the CLI prints its message without a traceback."""


class MemextError(Exception):
    """Bad input or state that the user can fix (a missing path, a corrupt checkpoint, ...)."""
