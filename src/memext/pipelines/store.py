"""Retrieval memory: a persistent store of text chunks with their embeddings and metadata.

One SQLite file in WAL mode: a ``meta`` table records the embedding model's name and dimension
when the store is created, and a store refuses any other model or dimension afterwards (vectors
of two models are not comparable). Each chunk is a row with its vector as a float32 blob, keyed
UNIQUE by a hash of (doc_id, text), so adding the same chunk again changes nothing. Every
``add`` is one transaction: a writer killed mid-way leaves the store as it was before that
call, never half a batch.

Search is exact top-k by cosine in numpy over vectors loaded once and refreshed when the file
changes (new rows only are read when rows were only added); ``index="faiss"`` swaps in an HNSW
index (approximate, sub-linear) for large stores. ``mode="bm25"`` ranks by words and
``mode="hybrid"`` fuses both rankings (``memext.pipelines.lexical``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from memext.errors import MemextError
from memext.io import transaction
from memext.pipelines.lexical import BM25, RRF_K, rank, reciprocal_rank_fusion, top_fused

if TYPE_CHECKING:
    from memext.pipelines.encoder import Encoder

FORMAT = "memext-retrieval-v1"
MODES = ("embedding", "bm25", "hybrid")
INDEXES = ("exact", "faiss")

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


def content_key(doc_id: str, text: str) -> bytes:
    return hashlib.sha256(doc_id.encode() + b"\0" + text.encode()).digest()


class RetrievalStore:
    """Chunks with embeddings in one SQLite file; a context manager.

    Args:
        path: the database file (created with its folder if missing), or ":memory:".
        encoder: embeds texts for ``add`` and text queries; its ``name`` and ``dim`` are the
            store's model.
        model, dim: the model without an encoder (vectors given by the caller). A new store
            needs one or the other; an existing one checks them against what it recorded.
        index: "exact" (numpy) or "faiss" (HNSW, approximate; for large stores).
        ef_search: HNSW breadth at query time (at least k): higher is slower and more exact.
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
    ) -> None:
        if index not in INDEXES:
            raise MemextError(f"index={index!r} is invalid: expected one of {INDEXES}")
        if encoder is not None:
            if model is not None and model != encoder.name:
                raise MemextError(f"model={model!r} contradicts the encoder's {encoder.name!r}")
            if dim is not None and dim != encoder.dim:
                raise MemextError(f"dim={dim} contradicts the encoder's dimension {encoder.dim}")
            model, dim = encoder.name, encoder.dim
        self.path = str(path)
        self.encoder = encoder
        self.index = index
        self.ef_search = ef_search
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit reaches the disk before add() returns, power loss included
            # (NORMAL would only survive a killed process).
            self.db.execute("PRAGMA synchronous=FULL")
            self.model, self.dim = self._init_meta(model, dim)
        except sqlite3.DatabaseError as e:
            raise MemextError(f"{self.path} is not a memext retrieval store: {e}") from None
        self._writes = 0  # own commits: PRAGMA data_version only counts other connections'
        self._seen: tuple[int, int] | None = None
        self._ids = np.zeros(0, dtype=np.int64)
        self._doc_ids: list[str] = []
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)  # rows of unit vectors
        self._faiss: Any = None
        self._bm25: tuple[tuple[int, int], BM25] | None = None

    def _init_meta(self, model: str | None, dim: int | None) -> tuple[str, int]:
        with transaction(self.db):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
            if not meta:
                if model is None or dim is None:
                    raise MemextError(
                        f"{self.path} is a new store: pass encoder=, or model= and dim=, so it "
                        "can record which embeddings it holds"
                    )
                if dim < 1:
                    raise MemextError(f"dim={dim} is invalid: expected >= 1")
                meta = {"format": FORMAT, "model": model, "dim": str(dim)}
                self.db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        if meta.get("format") != FORMAT:
            raise MemextError(
                f"{self.path} is not a {FORMAT} store (format {meta.get('format')!r})"
            )
        stored_model, stored_dim = meta["model"], int(meta["dim"])
        if (model is not None and model != stored_model) or (dim is not None and dim != stored_dim):
            raise MemextError(
                f"{self.path} holds embeddings of {stored_model!r} (dim {stored_dim}), not "
                f"{model or stored_model!r} (dim {dim or stored_dim}): vectors of different models "
                "cannot be compared; use another store or the same model"
            )
        return stored_model, stored_dim

    # --- writing ------------------------------------------------------------------------------
    def add(self, items: Iterable[Item]) -> int:
        """Store ``items`` in one transaction; returns how many were new.

        An item whose (doc_id, text) is already stored is skipped, so re-adding is harmless.
        Items without a vector are embedded with the store's encoder first.
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
                json.dumps(dict(it.metadata), ensure_ascii=False, sort_keys=True),
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
        out = []
        for it, v in zip(items, vectors, strict=True):
            v = np.asarray(v, dtype=np.float32)
            if v.shape != (self.dim,):
                raise MemextError(
                    f"item of {it.doc_id!r} has a vector of shape {v.shape}: this store holds "
                    f"{self.model!r} vectors of shape ({self.dim},)"
                )
            if not np.isfinite(v).all():
                raise MemextError(f"item of {it.doc_id!r} has a vector with NaN or inf")
            out.append(np.ascontiguousarray(v))
        return out

    def add_text(
        self,
        doc_id: str,
        text: str | bytes,
        *,
        overlap: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> int:
        """Chunk a document to the encoder's limit, embed and store it in one transaction.

        Each chunk's metadata is ``metadata`` plus ``chunk`` (its index) and ``start``/``end``
        (character offsets into ``text``). Returns how many chunks were new.
        """
        from memext.pipelines.chunking import chunk_text

        if self.encoder is None:
            raise MemextError("add_text needs an encoder: RetrievalStore(encoder=...)")
        chunks = chunk_text(text, self.encoder.tokenizer, self.encoder.max_tokens, overlap)
        vectors = self.encoder.embed_chunks(chunks)
        base = dict(metadata or {})
        return self.add(
            Item(doc_id, c.text, v, {**base, "chunk": c.index, "start": c.start, "end": c.end})
            for c, v in zip(chunks, vectors, strict=True)
        )

    def delete(self, doc_id: str) -> int:
        """Remove every chunk of ``doc_id``; returns how many."""
        with transaction(self.db):
            n = self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,)).rowcount
        self._writes += 1
        return n

    # --- reading ------------------------------------------------------------------------------
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


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MemextError(
            "index='faiss' needs faiss: pip install faiss-cpu (or index='exact')"
        ) from None
    return faiss
