"""The token stream ``memext stream`` reads: one or more texts, in order, sharing its tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from memext.data.prepare import text_ids
from memext.tokenizer import Tokenizer


def stream_text(
    texts: Sequence[str], tok: Tokenizer, tokens: int, log: Callable[[str], None] = print
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The token stream of ``texts`` read in order, at most ``tokens`` long.

    A text is ``stdlib`` (the built-in corpus's validation split: text memext runs do not train
    on) or a file, directory or glob (every file of it, in path order; ``memext.data.corpus``).
    Several texts share ``tokens`` equally; one shorter than its share leaves the rest to the
    others. Every document ends with the end-of-document token, and so does a text cut at its
    share when another follows. Returns the stream and one entry per text: ``text``, ``start``,
    ``tokens`` read and ``available``.
    """
    if not texts:
        raise ValueError("give at least one text to stream")
    if tokens < 2:
        raise ValueError(f"a stream needs at least 2 tokens, got tokens={tokens}")
    whole = [text_ids(t, tok, log) for t in texts]
    shares = share(tokens, [len(w) for w in whole])
    eod = tok.special_id("<eod>")
    parts, pieces, start = [], [], 0
    for i, (text, ids, n) in enumerate(zip(texts, whole, shares, strict=True)):
        piece = ids[:n]
        if 0 < n < len(ids) and i + 1 < len(texts):
            piece = np.append(ids[: n - 1], np.asarray(eod, dtype=ids.dtype))
        pieces.append(piece)
        parts.append({"text": text, "start": start, "tokens": n, "available": len(ids)})
        start += n
    return np.concatenate(pieces), parts


def share(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` split equally over texts of ``sizes`` tokens, smallest first, each taking at
    most its size and leaving the rest to those after it (the remainder of a division goes to
    the larger ones)."""
    out, left = [0] * len(sizes), total
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for rank, i in enumerate(order):
        out[i] = min(sizes[i], left // (len(sizes) - rank))
        left -= out[i]
    return out
