"""Atomic writes: a reader (or a resumed run) never sees a half-written file, nor a
half-applied change to an SQLite database."""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` in one step.

    The file's data and the rename are both flushed to disk (the file, then its folder), so
    after a crash ``path`` holds the old content or the new, never a mix. A failure to write
    for a reason outside memext (a full disk, a read-only folder) is a ``StorageError``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp(path)
        # The mode the kernel gave a new file (0666 less the umask): a writer may recreate the
        # file with a mode of its own (safetensors makes it 0600), so it is set again below.
        mode = os.stat(tmp).st_mode & 0o777
    except OSError as e:
        raise _translated(e, path) from None
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _translated(e, path) from None
        raise


def temp_name(path: Path) -> bool:
    """Whether ``path`` is the name of a temporary file ``atomic_write`` left behind (a kill
    before its rename): ``.NAME.XXXXXXXX.tmp`` beside ``NAME``."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def temp_files(path: Path) -> list[Path]:
    """The temporary files ``atomic_write(path, ...)`` may have left beside ``path``."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename, a new file) to disk, where the platform can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are durable as they are
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; nothing more can be done there
    finally:
        os.close(fd)


def _new_temp(path: Path) -> str:
    """Create an empty, unique temporary file beside ``path``, with mode 0666 less the umask as
    the kernel applies it to any new file (``mkstemp`` would make it 0600, and reading the
    umask from ``os.umask`` means setting it for a moment, which races with other threads)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(f"no free temporary name beside {str(path)!r}")


def _translated(e: OSError, path: Path) -> OSError:
    from memext.errors import StorageError, is_environmental, storage_error

    if isinstance(e, StorageError) or not is_environmental(e):
        return e
    return storage_error(e, path, "write")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build the folder ``path`` in one step: the block fills an empty temporary folder beside
    it, which is renamed to ``path`` when the block ends and removed when it raises.

    A reader therefore sees no folder or a complete one. If ``path`` appeared meanwhile (another
    process built the same thing), that one is kept and this one dropped. A process killed inside
    the block leaves its temporary folder, ``.NAME.PID-XXXXXXXX.tmp``; ``sweep_temp_dirs`` removes
    those whose process is gone.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
    except OSError as e:
        raise _translated(e, path) from None
    try:
        yield tmp
        try:
            tmp.rename(path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # built meanwhile by another process: keep it
        fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _translated(e, path) from None
        raise


def sweep_temp_dirs(folder: str | Path) -> list[Path]:
    """Remove the temporary folders ``atomic_dir`` left in ``folder`` whose process is no longer
    running (a kill mid-build); a live process's are left alone. Returns those removed."""
    removed = []
    for tmp in sorted(Path(folder).glob(".*.*-*.tmp")):
        pid = tmp.name.rsplit(".", 2)[-2].split("-")[0]
        if tmp.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours (EPERM), or the platform cannot tell
        return True
    return True


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any error, on an autocommit
    connection. IMMEDIATE takes the write lock up front, so two writers wait rather than fail
    half-way with "database is locked"."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
