"""The SQLite file under a retrieval store: its schema, opening it, and SQLite's errors.

``StoreFile`` opens the file (WAL, ``synchronous=FULL``), refuses a file that is not a store
before changing anything in it, and records or checks the embedding model (name, dimension,
encoder fingerprint) in the ``meta`` table. ``store_error`` turns SQLite's exceptions (a corrupt
or foreign file, a lock held too long, a full disk, a read-only file) into one ``StoreError``
naming the store and the fix; ``sqlite_errors`` does it for a store method.
``memext.pipelines.store`` tells the whole story.
"""

from __future__ import annotations

import functools
import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar
from urllib.parse import quote

from memext.errors import MemextError
from memext.io import transaction

if TYPE_CHECKING:
    from memext.pipelines.encoder import Encoder

FORMAT = "memext-retrieval-v1"
#: Seconds a writer waits for another writer's lock before giving up.
BUSY_TIMEOUT = 30.0

P = ParamSpec("P")
R = TypeVar("R")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    -- AUTOINCREMENT: a deleted id is never reused, so "ids above the last one read" are
    -- exactly the rows added since
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key BLOB NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL,
    metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc_id ON chunks (doc_id);
"""


class StoreError(MemextError):
    """The store itself failed (corrupt, locked, full disk, read-only): no use trying the next
    document."""


def require_store(path: str | Path) -> None:
    """Refuse a store file that does not exist: a mistyped path must not make an empty one."""
    if str(path) != ":memory:" and not Path(path).exists():
        raise StoreError(
            f"no retrieval store at {path}: check the path; "
            f"`memext memory add --store {path} FILE...` makes one"
        )


def store_error(path: str, e: sqlite3.Error) -> StoreError:
    """SQLite's error on store ``path`` as one line: what is wrong and what to do."""
    name = getattr(e, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(e):
        why = (
            f"another process held its write lock for over {BUSY_TIMEOUT:g} s; try again when "
            "it has finished"
        )
    elif name.startswith("SQLITE_READONLY"):
        why = "it (or its folder) is read-only; make it writable or use another --store"
    elif name.startswith("SQLITE_FULL"):
        why = "the disk is full; free some space and try again (the store is as it was)"
    elif name.startswith("SQLITE_CANTOPEN"):
        why = "cannot open it; check that it is a file in a folder you can write"
    elif name.startswith("SQLITE_IOERR"):
        why = "the disk failed to read or write it; check the disk, then try again"
    elif name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or type(e) is sqlite3.DatabaseError:
        why = (
            "it is corrupt or not a memext retrieval store; restore it from a backup, or move "
            "it aside and `memext memory add` the documents into a new one"
        )
    else:
        why = "SQLite refused it"
    return StoreError(f"retrieval store {path}: {why} (sqlite: {e})")


def sqlite_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Turn SQLite's exceptions in a store method into ``store_error``."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as e:
            raise store_error(args[0].path, e) from None  # type: ignore[attr-defined]

    return wrapper


class StoreFile:
    """The SQLite connection of a store and the model it records; ``RetrievalStore``'s base.

    Opening refuses a folder, a missing file unless ``create`` (``readonly`` implies it), and
    any SQLite database without a store's tables, before it changes anything in the file.
    """

    path: str
    db: sqlite3.Connection
    readonly: bool
    encoder: Encoder | None  # set by the subclass before opening: a warning names its folder
    model: str
    dim: int
    _writes: int  # own commits: PRAGMA data_version only counts other connections'

    def __init__(
        self,
        path: str | Path,
        *,
        model: str | None,
        dim: int | None,
        fingerprint: str | None,
        readonly: bool,
        create: bool,
    ) -> None:
        self.path = str(path)
        self.readonly = readonly
        memory = self.path == ":memory:"
        if not memory:
            file = Path(self.path)
            if file.is_dir():
                raise StoreError(f"{self.path} is a folder, not a retrieval store file")
            if readonly or not create:
                require_store(file)
            if not readonly:
                try:
                    file.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise MemextError(f"cannot make the folder of store {self.path}: {e}") from None
        try:
            if readonly and not memory:
                uri = f"file:{quote(str(Path(self.path).resolve()))}?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
            else:
                self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            try:
                self._check_ours(readonly)
                if not readonly:
                    self.db.execute("PRAGMA journal_mode=WAL")
                    # FULL: a commit reaches the disk before add() returns, power loss included
                    # (NORMAL would only survive a killed process).
                    self.db.execute("PRAGMA synchronous=FULL")
                self.model, self.dim = self._init_meta(model, dim, fingerprint)
            except BaseException:
                self.db.close()
                raise
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None
        self._writes = 0

    def _check_ours(self, readonly: bool) -> None:
        """Refuse someone else's SQLite database before changing anything in it (not even its
        journal mode); an empty file becomes a new store unless ``readonly``."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}
        if (tables or readonly) and not {"meta", "chunks"} <= tables:
            raise StoreError(
                f"{self.path} is not a memext retrieval store (an SQLite database without its "
                "tables); choose another --store"
            )

    def _init_meta(
        self, model: str | None, dim: int | None, fingerprint: str | None
    ) -> tuple[str, int]:
        if self.readonly:
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
        else:
            with transaction(self.db):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                meta = dict(self.db.execute("SELECT key, value FROM meta"))
                if not meta:
                    if model is None or dim is None:
                        raise MemextError(
                            f"{self.path} is a new store: pass encoder=, or model= and dim=, so "
                            "it can record which embeddings it holds"
                        )
                    if dim < 1:
                        raise MemextError(f"dim={dim} is invalid: expected >= 1")
                    meta = {"format": FORMAT, "model": model, "dim": str(dim)}
                    if fingerprint is not None:
                        meta["encoder"] = fingerprint
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        if meta.get("format") != FORMAT:
            raise MemextError(
                f"{self.path} is not a {FORMAT} store (format {meta.get('format')!r})"
            )
        stored_model, stored_dim = meta["model"], int(meta["dim"])
        stored_print = meta.get("encoder")
        if fingerprint is not None and stored_print is not None:
            if fingerprint != stored_print or dim != stored_dim:
                raise MemextError(
                    f"{self.path} holds embeddings of {stored_model!r} ({stored_print[:12]}, "
                    f"dim {stored_dim}), but the encoder given is another model ({model!r}, "
                    f"{fingerprint[:12]}, dim {dim}): vectors of different models cannot be "
                    "compared; use another store or the encoder it was built with (--encoder)"
                )
            return stored_model, stored_dim
        if (model is not None and model != stored_model) or (dim is not None and dim != stored_dim):
            raise MemextError(
                f"{self.path} holds embeddings of {stored_model!r} (dim {stored_dim}), not "
                f"{model or stored_model!r} (dim {dim or stored_dim}): vectors of different models "
                "cannot be compared; use another store or the same model"
            )
        if fingerprint is not None and not self.readonly:
            # A store from before fingerprints: it records only the model's name.
            with transaction(self.db):
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('encoder', ?)", (fingerprint,))
            warnings.warn(
                f"{self.path} recorded only its model's name, {stored_model!r}; it now records "
                f"the fingerprint of the encoder in {self.encoder.path if self.encoder else '?'} "
                f"({fingerprint[:12]}). If its vectors came from another model of that name, "
                "rebuild it.",
                stacklevel=4,  # the caller of RetrievalStore(...)
            )
        return stored_model, stored_dim

    @sqlite_errors
    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def _version(self) -> tuple[int, int]:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0]), self._writes
