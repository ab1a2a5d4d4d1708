"""Lexical retrieval: BM25 (``bm25s``, Lucene's variant, on sparse matrices) and reciprocal-rank
fusion.

BM25 finds the exact words (names, numbers, rare terms) that embeddings blur; fusing its ranks
with the embedding ranks (Cormack et al. 2009: ``score = sum 1 / (k + rank)``, k = 60) needs no
score calibration between the two, which is why hybrid search uses ranks rather than scores.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

# Words are runs of letters and digits; CJK has no spaces, so each CJK character is a word.
_WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")

RRF_K = 60


def words(text: str) -> list[str]:
    """The lower-cased words BM25 counts."""
    return _WORDS.findall(text.lower())


class BM25:
    """BM25 scores of a query against a fixed list of texts (rebuild it when the texts change).

    Lucene's variant: ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))`` is always positive, so a text
    scores above 0 exactly when it holds a query word; k1 = 1.5, b = 0.75. ``bm25s`` keeps the
    per-word scores of every text in a sparse matrix, so a query costs its words' columns, not a
    Python pass over every text.
    """

    K1, B = 1.5, 0.75

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s

        corpus = [words(t) for t in texts]
        self.n = len(corpus)
        self._bm25 = None
        if any(corpus):  # bm25s cannot index a corpus without a single word
            self._bm25 = bm25s.BM25(k1=self.K1, b=self.B, method="lucene")
            self._bm25.index(corpus, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """(n,) float64 score of every text; a repeated query word counts again, and a text scores
        above 0 exactly when it holds a query word."""
        terms = words(query)
        if self._bm25 is None or not terms:
            return np.zeros(self.n)
        return np.asarray(self._bm25.get_scores(terms), dtype=np.float64)


def rank(scores: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Positions sorted best first (ties: lower position first), only where ``keep``."""
    order = np.argsort(-scores, kind="stable")
    return order if keep is None else order[keep[order]]


def reciprocal_rank_fusion(rankings: Iterable[np.ndarray], n: int, k: int = RRF_K) -> np.ndarray:
    """(n,) fused score of every position: the sum over rankings of ``1 / (k + rank)``, rank from
    1; 0 for a position in no ranking. Each ranking is an array of distinct positions < n."""
    if k < 0:
        raise ValueError(f"rrf k={k} is invalid: expected >= 0")
    fused = np.zeros(n)
    for ranking in rankings:
        fused[ranking] += 1.0 / (k + np.arange(1, len(ranking) + 1))
    return fused


def top_fused(fused: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` positions with the highest fused score above 0, best first (ties: lower first)."""
    candidates = np.flatnonzero(fused > 0)
    if len(candidates) > k:  # only the best k need sorting
        candidates = candidates[np.argpartition(-fused[candidates], k - 1)[:k]]
        # argpartition splits ties at the k-th score arbitrarily: take every tie back in
        candidates = np.flatnonzero(fused >= fused[candidates].min())
    return candidates[np.lexsort((candidates, -fused[candidates]))][:k]
