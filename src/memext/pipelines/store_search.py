"""Searching a retrieval store: exact or HNSW vectors, BM25 words, or both fused.

The vectors are loaded once into a matrix of unit rows and refreshed when the file changes
(only the new rows are read when rows were only added); ``index="faiss"`` keeps an HNSW index
(approximate, sub-linear) beside them for large stores. ``mode="bm25"`` ranks by words and
``mode="hybrid"`` fuses both rankings (``memext.pipelines.lexical``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from memext.errors import MemextError
from memext.pipelines.lexical import BM25, RRF_K, rank, reciprocal_rank_fusion, top_fused
from memext.pipelines.store_db import StoreFile, sqlite_errors

MODES = ("embedding", "bm25", "hybrid")
INDEXES = ("exact", "faiss")


@dataclass(frozen=True)
class Hit:
    """A search result. ``score``: cosine (embedding), BM25 score, or fused 1/(k + rank) sum."""

    id: int
    doc_id: str
    text: str
    score: float
    metadata: dict[str, Any]


class StoreSearch(StoreFile):
    """The search half of ``RetrievalStore``: the in-memory index and ``search``."""

    index: str
    ef_search: int

    def _init_index(self) -> None:
        """Empty in-memory vectors; the first search loads them (``_refresh``)."""
        self._seen: tuple[int, int] | None = None
        self._ids = np.zeros(0, dtype=np.int64)
        self._doc_ids: list[str] = []
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)  # rows of unit vectors
        self._faiss: Any = None
        self._bm25: tuple[tuple[int, int], BM25] | None = None

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

    @sqlite_errors
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


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MemextError(
            "index='faiss' needs faiss: pip install faiss-cpu (or index='exact')"
        ) from None
    return faiss
