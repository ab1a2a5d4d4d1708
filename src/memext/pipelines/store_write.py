"""Writing to a retrieval store: chunks, and documents replaced as a whole.

``add`` stores chunks in one transaction, keyed UNIQUE by a hash of (doc_id, text), so adding
the same chunk again changes nothing. A *document* (``add_text``, ``add_file``, ``replace``) is
chunked and embedded a batch at a time into a private staging table (a long file takes bounded
memory), then one transaction adds its new chunks and deletes those no longer in it; unchanged
chunks keep their rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memext.errors import MemextError
from memext.io import transaction
from memext.pipelines.store_db import StoreFile, sqlite_errors

if TYPE_CHECKING:
    from memext.pipelines.chunking import Chunk

#: Chunks embedded and staged at a time while a document is added.
STAGE_BATCH = 256


@dataclass(frozen=True)
class Item:
    """A chunk to store; without ``vector`` the store's encoder embeds ``text``."""

    doc_id: str
    text: str
    vector: np.ndarray | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Replaced:
    """What adding a document changed: ``chunks`` in its new version, ``new`` of them not
    stored before, ``removed`` stale chunks of its old version deleted."""

    doc_id: str
    chunks: int
    new: int
    removed: int


def content_key(doc_id: str, text: str) -> bytes:
    return hashlib.sha256(doc_id.encode() + b"\0" + text.encode()).digest()


class StoreWriter(StoreFile):
    """The writing half of ``RetrievalStore``: chunks, documents, deletions."""

    @sqlite_errors
    def add(self, items: Iterable[Item]) -> int:
        """Store ``items`` in one transaction; returns how many were new.

        An item whose (doc_id, text) is already stored is skipped, so re-adding is harmless.
        Items without a vector are embedded with the store's encoder first. Chunks are added
        beside what is stored: to replace a document, use ``add_text`` or ``add_file``.
        """
        items = list(items)
        for item in items:
            if not isinstance(item, Item):
                raise TypeError(f"add takes Item objects, got {type(item).__name__}")
        vectors = self._vectors_of(items)
        rows = [
            (
                content_key(it.doc_id, it.text),
                it.doc_id,
                it.text,
                v.tobytes(),
                _json(it.metadata),
            )
            for it, v in zip(items, vectors, strict=True)
        ]
        before = self.db.total_changes
        with transaction(self.db):
            self.db.executemany(
                "INSERT OR IGNORE INTO chunks (key, doc_id, text, vector, metadata) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        self._writes += 1
        return self.db.total_changes - before

    def _vectors_of(self, items: list[Item]) -> list[np.ndarray]:
        todo = [i for i, it in enumerate(items) if it.vector is None]
        vectors: list[np.ndarray | None] = [it.vector for it in items]
        if todo:
            if self.encoder is None:
                raise MemextError(
                    "items without vectors need an encoder: RetrievalStore(encoder=...)"
                )
            for i, v in zip(todo, self.encoder.embed([items[i].text for i in todo]), strict=True):
                vectors[i] = v
        return [self._checked(it.doc_id, v) for it, v in zip(items, vectors, strict=True)]

    def _checked(self, doc_id: str, vector: Any) -> np.ndarray:
        v = np.asarray(vector, dtype=np.float32)
        if v.shape != (self.dim,):
            raise MemextError(
                f"item of {doc_id!r} has a vector of shape {v.shape}: this store holds "
                f"{self.model!r} vectors of shape ({self.dim},)"
            )
        if not np.isfinite(v).all():
            raise MemextError(f"item of {doc_id!r} has a vector with NaN or inf")
        return np.ascontiguousarray(v)

    def add_text(
        self,
        doc_id: str,
        text: str | bytes,
        *,
        overlap: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> int:
        """Chunk a document to the encoder's limit, embed it, and store it in place of what
        ``doc_id`` held (see ``replace``). Returns how many chunks were new."""
        from memext.pipelines.chunking import check_text

        return self.replace(doc_id, [check_text(text)], overlap=overlap, metadata=metadata).new

    def add_file(
        self,
        path: str | Path,
        *,
        overlap: int = 0,
        metadata: Mapping[str, Any] | None = None,
        progress: bool | None = None,
    ) -> Replaced:
        """Add a UTF-8 text file as the document ``document_id(path)``, replacing its earlier
        version; read, chunked and embedded in pieces, so its length does not bound memory.

        Each chunk's metadata holds ``path`` (the file's absolute path). ``progress`` shows a
        bar over the file's bytes (default: the encoder's setting).
        """
        from tqdm.auto import tqdm

        from memext.pipelines.documents import text_pieces

        file = Path(path)
        try:
            size = file.stat().st_size
        except OSError as e:
            raise MemextError(f"cannot read {file}: {e.strerror or e}") from None
        show = progress if progress is not None else bool(self.encoder and self.encoder.progress)
        with tqdm(
            total=size, unit="B", unit_scale=True, desc=file.name, disable=not show, leave=False
        ) as bar:
            return self.replace(
                self.document_id(file),
                text_pieces(file, on_read=bar.update),
                overlap=overlap,
                metadata={"path": str(file.resolve()), **(metadata or {})},
            )

    def document_id(self, path: str | Path) -> str:
        """The doc id of a file: its resolved path relative to the store's folder (POSIX
        separators), so the same file is one document whatever the working directory and
        however the path was spelled, and a folder of documents moved along with its store keeps
        its ids. (An absolute path would tie the store to this machine's layout; the path as
        typed made ``a.md`` and ``./a.md`` two documents.)"""
        anchor = Path.cwd() if self.path == ":memory:" else Path(self.path).resolve().parent
        file = Path(path).resolve()
        try:
            return Path(os.path.relpath(file, anchor)).as_posix()
        except ValueError:  # another drive (Windows): no relative path exists
            return file.as_posix()

    @sqlite_errors
    def replace(
        self,
        doc_id: str,
        pieces: Iterable[str],
        *,
        overlap: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> Replaced:
        """Make ``doc_id`` hold exactly the chunks of the text ``pieces`` form.

        The text is chunked (``iter_chunks``) and embedded a batch at a time into a private
        staging table (memory stays bounded), then one transaction adds the chunks not yet
        stored and deletes the document's chunks that are no longer in it. Unchanged chunks keep
        their rows; their metadata (offsets) is brought up to date. A failure before that
        transaction (unreadable text, an interrupt) leaves the document as it was.

        Each chunk's metadata is ``metadata`` plus ``chunk`` (its index) and ``start``/``end``
        (character offsets into the text).
        """
        from memext.pipelines import chunking

        if self.encoder is None:
            raise MemextError("adding a document needs an encoder: RetrievalStore(encoder=...)")
        if self.readonly:
            raise MemextError(f"{self.path} was opened read-only")
        enc = self.encoder
        base = dict(metadata or {})
        chunks = chunking.iter_chunks(
            pieces, enc.tokenizer, enc.max_tokens, overlap, window=chunking.WINDOW
        )
        self.db.execute("ATTACH DATABASE '' AS staged")  # private, on disk past a few MB
        try:
            self.db.execute(
                "CREATE TABLE staged.chunks (seq INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, "
                "text TEXT NOT NULL, vector BLOB NOT NULL, metadata TEXT NOT NULL)"
            )
            for batch in _batches(chunks, STAGE_BATCH):
                vectors = enc.embed_chunks(batch, progress=False)
                rows = [
                    (
                        content_key(doc_id, c.text),
                        c.text,
                        self._checked(doc_id, v).tobytes(),
                        _json({**base, "chunk": c.index, "start": c.start, "end": c.end}),
                    )
                    for c, v in zip(batch, vectors, strict=True)
                ]
                # A deferred transaction locks only what it writes: the staging table, never
                # the store (BEGIN IMMEDIATE would take the store's write lock too).
                self.db.execute("BEGIN")
                try:
                    self.db.executemany(
                        "INSERT OR IGNORE INTO staged.chunks (key, text, vector, metadata) "
                        "VALUES (?, ?, ?, ?)",
                        rows,
                    )
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
            with transaction(self.db):
                total, new = self.db.execute(
                    "SELECT COUNT(*), COUNT(*) - COUNT(c.id) FROM staged.chunks s "
                    "LEFT JOIN main.chunks c ON c.key = s.key"
                ).fetchone()
                removed = self.db.execute(
                    "DELETE FROM main.chunks WHERE doc_id = ? "
                    "AND key NOT IN (SELECT key FROM staged.chunks)",
                    (doc_id,),
                ).rowcount
                # WHERE true: SQLite's rule for an upsert whose rows come from a SELECT
                self.db.execute(
                    "INSERT INTO main.chunks (key, doc_id, text, vector, metadata) "
                    "SELECT key, ?, text, vector, metadata FROM staged.chunks WHERE true "
                    "ORDER BY seq ON CONFLICT (key) DO UPDATE SET metadata = excluded.metadata",
                    (doc_id,),
                )
            self._writes += 1
        finally:
            self.db.execute("DETACH DATABASE staged")
        return Replaced(doc_id, int(total), int(new), int(removed))

    @sqlite_errors
    def delete(self, *doc_ids: str) -> int:
        """Remove every chunk of the documents ``doc_ids``, in one transaction; returns how
        many chunks."""
        with transaction(self.db):
            n = sum(
                self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (d,)).rowcount
                for d in doc_ids
            )
        self._writes += 1
        return n

    @sqlite_errors
    def has_document(self, doc_id: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM chunks WHERE doc_id = ? LIMIT 1", (doc_id,)).fetchone()
            is not None
        )


def _json(metadata: Mapping[str, Any]) -> str:
    return json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True)


def _batches(chunks: Iterable[Chunk], size: int) -> Iterator[list[Chunk]]:
    batch: list[Chunk] = []
    for c in chunks:
        batch.append(c)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
