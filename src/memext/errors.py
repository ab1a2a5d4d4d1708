"""The exceptions a user can act on: the CLI prints their message without a traceback."""

from __future__ import annotations

import errno
import os


class MemextError(Exception):
    """Bad input or state that the user can fix (a missing path, a corrupt checkpoint, ...)."""


class StorageError(MemextError, OSError):
    """A file could not be written or read for a reason outside memext: a full disk, a
    read-only folder, missing permissions. Still an ``OSError``, so code that handles those
    keeps working; the message names the path, the cause and the fix."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# errno -> (the cause in words, what to do about it)
_CAUSES = {
    errno.ENOSPC: ("the disk is full", "free some space"),
    errno.EDQUOT: ("the disk quota is exhausted", "free some space"),
    errno.EROFS: ("the file system is read-only", "choose a writable location"),
    errno.EACCES: ("permission denied", "check the folder's permissions"),
    errno.EPERM: ("operation not permitted", "check the folder's permissions"),
}


def is_environmental(e: BaseException) -> bool:
    """An OSError whose cause is the machine (disk, permissions), not memext."""
    return isinstance(e, OSError) and e.errno in _CAUSES


def storage_error(e: OSError, path: str | os.PathLike, doing: str, then: str = "") -> StorageError:
    """A one-line StorageError for ``e``, raised while ``doing`` (e.g. "write") ``path``."""
    cause, fix = _CAUSES.get(e.errno or 0, (e.strerror or str(e), ""))
    fix = "; ".join(p for p in (fix, then) if p)
    err = StorageError(f"cannot {doing} {str(path)!r}: {cause}" + (f"; {fix}" if fix else ""))
    err.errno, err.strerror, err.filename = e.errno, e.strerror, str(path)
    return err
