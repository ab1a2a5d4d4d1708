"""Retrieval memory: a persistent store of text chunks with their embeddings and metadata.

One SQLite file in WAL mode: a ``meta`` table records the embedding model when the store is
created (its name, its dimension and, with an encoder, its fingerprint: a hash of every file of
the model folder, as classifiers record), and a store refuses any other model afterwards
(vectors of two models are not comparable). A store made before fingerprints holds only the
model's name: it is accepted for an encoder of that name, and records that encoder's
fingerprint the first time it is opened for writing (with a warning that says so).

Each chunk is a row with its vector as a float32 blob, keyed UNIQUE by a hash of (doc_id,
text), so adding the same chunk again changes nothing. Every ``add`` is one transaction: a
writer killed mid-way leaves the store as it was before that call, never half a batch.

A *document* (``add_text``, ``add_file``) is replaced as a whole: its chunks are embedded
first (streamed through a private staging table, so a long file takes bounded memory), then
one transaction stores the new chunks and deletes the document's chunks that are no longer in
it. Unchanged chunks keep their rows. A file's doc id is its path relative to the store's
folder (``RetrievalStore.document_id``), so ``a.md`` and ``./a.md`` are one document.

Search is exact top-k by cosine in numpy over vectors loaded once and refreshed when the file
changes (new rows only are read when rows were only added); ``index="faiss"`` swaps in an HNSW
index (approximate, sub-linear) for large stores. ``mode="bm25"`` ranks by words and
``mode="hybrid"`` fuses both rankings (``memext.pipelines.lexical``).

SQLite's own errors (a corrupt or foreign file, a lock held too long, a full disk, a read-only
file) become one ``MemextError`` naming the store and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar
from urllib.parse import quote

import numpy as np

from memext.errors import MemextError
from memext.io import transaction
from memext.pipelines.lexical import BM25, RRF_K, rank, reciprocal_rank_fusion, top_fused

if TYPE_CHECKING:
    from memext.pipelines.chunking import Chunk
    from memext.pipelines.encoder import Encoder

FORMAT = "memext-retrieval-v1"
MODES = ("embedding", "bm25", "hybrid")
INDEXES = ("exact", "faiss")
#: Seconds a writer waits for another writer's lock before giving up.
BUSY_TIMEOUT = 30.0
#: Chunks embedded and staged at a time while a document is added.
STAGE_BATCH = 256

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


@dataclass(frozen=True)
class Item:
    """A chunk to store; without ``vector`` the store's encoder embeds ``text``."""

    doc_id: str
    text: str
    vector: np.ndarray | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """A search result. ``score``: cosine (embedding), BM25 score, or fused 1/(k + rank) sum."""

    id: int
    doc_id: str
    text: str
    score: float
    metadata: dict[str, Any]


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


def _sqlite_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Turn SQLite's exceptions in a store method into ``store_error``."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as e:
            raise store_error(args[0].path, e) from None  # type: ignore[attr-defined]

    return wrapper


class RetrievalStore:
    """Chunks with embeddings in one SQLite file; a context manager.

    Args:
        path: the database file (created with its folder if missing), or ":memory:".
        encoder: embeds texts for ``add`` and text queries; its ``name``, ``dim`` and
            ``fingerprint`` are the store's model.
        model, dim: the model without an encoder (vectors given by the caller). A new store
            needs one or the other; an existing one checks them against what it recorded.
        index: "exact" (numpy) or "faiss" (HNSW, approximate; for large stores).
        ef_search: HNSW breadth at query time (at least k): higher is slower and more exact.
        readonly: open an existing store for reading only (search); nothing is written.
        create: make the store if ``path`` does not exist; False refuses a missing one (and
            ``readonly`` implies it), so a mistyped path is an error, not an empty store.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        encoder: Encoder | None = None,
        model: str | None = None,
        dim: int | None = None,
        index: Literal["exact", "faiss"] = "exact",
        ef_search: int = 128,
        readonly: bool = False,
        create: bool = True,
    ) -> None:
        if index not in INDEXES:
            raise MemextError(f"index={index!r} is invalid: expected one of {INDEXES}")
        fingerprint = None
        if encoder is not None:
            if model is not None and model != encoder.name:
                raise MemextError(f"model={model!r} contradicts the encoder's {encoder.name!r}")
            if dim is not None and dim != encoder.dim:
                raise MemextError(f"dim={dim} contradicts the encoder's dimension {encoder.dim}")
            model, dim, fingerprint = encoder.name, encoder.dim, encoder.fingerprint
        self.path = str(path)
        self.encoder = encoder
        self.index = index
        self.ef_search = ef_search
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
        self._writes = 0  # own commits: PRAGMA data_version only counts other connections'
        self._seen: tuple[int, int] | None = None
        self._ids = np.zeros(0, dtype=np.int64)
        self._doc_ids: list[str] = []
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)  # rows of unit vectors
        self._faiss: Any = None
        self._bm25: tuple[tuple[int, int], BM25] | None = None

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
                stacklevel=3,
            )
        return stored_model, stored_dim

    # --- writing ------------------------------------------------------------------------------
    @_sqlite_errors
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

    @_sqlite_errors
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

    @_sqlite_errors
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

    @_sqlite_errors
    def has_document(self, doc_id: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM chunks WHERE doc_id = ? LIMIT 1", (doc_id,)).fetchone()
            is not None
        )

    # --- reading ------------------------------------------------------------------------------
    @_sqlite_errors
    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def _version(self) -> tuple[int, int]:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0]), self._writes

    def _refresh(self) -> None:
        """Bring the in-memory vectors (and the faiss index) up to date with the file."""
        if self._version() == self._seen:
            return
        self.db.execute("BEGIN")  # one snapshot: a writer committing meanwhile is not half-read
        try:
            version = self._version()
            last = int(self._ids[-1]) if len(self._ids) else 0
            kept = self.db.execute("SELECT COUNT(*) FROM chunks WHERE id <= ?", (last,)).fetchone()
            appended = kept[0] == len(self._ids)  # nothing deleted: read only the new rows
            rows = self.db.execute(
                "SELECT id, doc_id, vector FROM chunks WHERE id > ? ORDER BY id",
                (last if appended else 0,),
            ).fetchall()
        finally:
            self.db.execute("COMMIT")
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(-1, self.dim)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix = matrix / np.where(norms > 0, norms, 1)  # cosine; a zero vector scores 0
        if appended:
            self._ids = np.concatenate([self._ids, ids])
            self._doc_ids += [r[1] for r in rows]
            self._matrix = np.concatenate([self._matrix, matrix])
        else:
            self._ids, self._doc_ids, self._matrix = ids, [r[1] for r in rows], matrix
            self._faiss = None
        if self.index == "faiss":
            self._faiss_add(matrix)
        self._seen = version

    def _faiss_add(self, new_rows: np.ndarray) -> None:
        faiss = _faiss()
        if self._faiss is None:
            self._faiss = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            new_rows = self._matrix
        if len(new_rows):
            self._faiss.add(np.ascontiguousarray(new_rows))

    def index_nbytes(self) -> int:
        """Bytes of the in-memory search index as loaded now: the faiss HNSW graph serialised
        (vectors included), or the exact index's float32 matrix; 0 before the first search."""
        if self._faiss is not None:
            return int(_faiss().serialize_index(self._faiss).nbytes)
        return int(self._matrix.nbytes)

    @_sqlite_errors
    def search(
        self,
        query: str | np.ndarray,
        k: int = 5,
        *,
        mode: Literal["embedding", "bm25", "hybrid"] = "embedding",
        query_vector: np.ndarray | None = None,
        rrf_k: int = RRF_K,
        doc_prefix: str | None = None,
    ) -> list[Hit]:
        """The ``k`` best chunks for ``query``, best first.

        Args:
            query: text (embedded with the encoder unless ``query_vector`` is given), or a
                vector (``embedding`` mode only).
            mode: "embedding" (cosine), "bm25" (words), or "hybrid" (reciprocal-rank fusion of
                both: ``sum 1 / (rrf_k + rank)``).
            query_vector: the query's embedding, when the caller has it already.
            rrf_k: the fusion constant (60, as in Cormack et al. 2009).
            doc_prefix: only chunks whose doc_id starts with this (exact search, also with
                ``index="faiss"``).
        """
        if mode not in MODES:
            raise MemextError(f"mode={mode!r} is invalid: expected one of {MODES}")
        if k < 1:
            raise MemextError(f"k={k} is invalid: expected >= 1")
        text = query if isinstance(query, str) else None
        if text is None:
            if mode != "embedding":
                raise MemextError(f"mode={mode!r} needs the query as text")
            query_vector = query
        q = None if mode == "bm25" else self._query_vector(text, query_vector)
        self._refresh()
        if not len(self._ids):
            return []
        keep = (
            None
            if doc_prefix is None
            else np.array([d.startswith(doc_prefix) for d in self._doc_ids], dtype=bool)
        )
        if mode == "bm25":
            assert text is not None
            scores, by_words = self._bm25_ranking(text, keep)
            found = by_words[:k]
            return self._hits(found, scores[found])
        assert q is not None
        if mode == "embedding":
            if self.index == "faiss" and keep is None:
                return self._faiss_search(q, k)
            scores = self._matrix @ q  # (n,)
            found = rank(scores, keep)[:k]
            return self._hits(found, scores[found])
        assert text is not None
        by_vector = rank(self._matrix @ q, keep)
        _, by_words = self._bm25_ranking(text, keep)
        fused = reciprocal_rank_fusion([by_vector, by_words], len(self._ids), rrf_k)
        best = top_fused(fused, k)
        return self._hits(best, fused[best])

    def _query_vector(self, text: str | None, vector: np.ndarray | None) -> np.ndarray:
        if vector is None:
            if self.encoder is None:
                raise MemextError(
                    "searching by text needs an encoder (RetrievalStore(encoder=...)), "
                    "or pass query_vector="
                )
            vector = self.encoder.embed([text or ""])[0]
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.shape != (self.dim,):
            raise MemextError(f"the query vector has shape {q.shape}: expected ({self.dim},)")
        norm = float(np.linalg.norm(q))
        return q / norm if norm > 0 else q

    def _faiss_search(self, q: np.ndarray, k: int) -> list[Hit]:
        self._faiss.hnsw.efSearch = max(self.ef_search, k)
        scores, positions = self._faiss.search(q[None], min(k, len(self._ids)))
        hit = positions[0] >= 0  # faiss pads with -1 when it finds fewer than k
        return self._hits(positions[0][hit], scores[0][hit])

    def _bm25_ranking(self, text: str, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """BM25 scores of every stored chunk (aligned with the in-memory vectors), and the
        positions that hold a query word (score > 0) and are kept, best first."""
        if self._bm25 is None or self._bm25[0] != self._seen:
            rows = dict(self.db.execute("SELECT id, text FROM chunks").fetchall())
            # A writer may have committed since _refresh: score only the rows it loaded.
            texts = [rows.get(int(i), "") for i in self._ids]
            assert self._seen is not None
            self._bm25 = (self._seen, BM25(texts))
        scores = self._bm25[1].scores(text)
        matched = scores > 0
        return scores, rank(scores, matched if keep is None else matched & keep)

    def _hits(self, positions: np.ndarray, scores: np.ndarray) -> list[Hit]:
        ids = [int(self._ids[p]) for p in positions]
        if not ids:
            return []
        rows = {
            r[0]: r[1:]
            for r in self.db.execute(
                f"SELECT id, doc_id, text, metadata FROM chunks WHERE id IN ({','.join('?' * len(ids))})",
                ids,
            )
        }
        return [
            Hit(i, rows[i][0], rows[i][1], float(s), json.loads(rows[i][2]))
            for i, s in zip(ids, scores, strict=True)
            if i in rows  # deleted by another process since the vectors were read
        ]

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> RetrievalStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RetrievalStore({self.path!r}, model={self.model!r}, dim={self.dim})"


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


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MemextError(
            "index='faiss' needs faiss: pip install faiss-cpu (or index='exact')"
        ) from None
    return faiss
