"""Lexical retrieval: BM25 (``rank-bm25``'s Okapi variant) and reciprocal-rank fusion.

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
    """BM25 scores of a query against a fixed list of texts (rebuild it when the texts change)."""

    def __init__(self, texts: Sequence[str]) -> None:
        from rank_bm25 import BM25Okapi

        corpus = [words(t) for t in texts]
        self.n = len(corpus)
        # rank-bm25 divides by the mean document length: no words at all would be 0 / 0.
        self._bm25 = BM25Okapi(corpus) if any(corpus) else None

    def scores(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """(n,) float64 score of every text, and (n,) bool: does it hold any query word.

        The second matters because rank-bm25 floors a negative idf (a word in over half the
        texts) at a fraction of the *mean* idf, which is itself negative in a tiny corpus: a
        matching text can then score below one that matches nothing.
        """
        terms = words(query)
        if self._bm25 is None or not terms:
            return np.zeros(self.n), np.zeros(self.n, dtype=bool)
        scores = np.asarray(self._bm25.get_scores(terms), dtype=np.float64)
        wanted = set(terms)
        matched = np.array([not wanted.isdisjoint(doc) for doc in self._bm25.doc_freqs])
        return scores, matched


def rank(scores: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Positions sorted best first (ties: lower position first), only where ``keep``."""
    order = np.argsort(-scores, kind="stable")
    return order if keep is None else order[keep[order]]


def reciprocal_rank_fusion(rankings: Iterable[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Fused score of every item in any ranking: the sum of ``1 / (k + rank)``, rank from 1."""
    if k < 0:
        raise ValueError(f"rrf k={k} is invalid: expected >= 0")
    fused: dict[int, float] = {}
    for ranking in rankings:
        for r, item in enumerate(ranking, start=1):
            fused[int(item)] = fused.get(int(item), 0.0) + 1.0 / (k + r)
    return fused
