"""Haystacks: the token arrays synthetic task samples hide their keys in.

A ``Filler`` is cut from at random (``take``); it comes from any text (``from_text``), from the
built-in corpus (``stdlib``, read once per process and cached per tokenizer), or from the classic
passkey filler.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from memext.data.corpus import read_corpus
from memext.tokenizer import ByteTokenizer, Tokenizer

# The classic passkey filler (Mohtashami & Jaggi 2023): prose a small model learns in minutes, so
# a short budget goes to learning retrieval rather than the haystack.
CLASSIC_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


@dataclass(frozen=True, eq=False)
class Filler:
    """A 1-D token array that haystacks are cut from."""

    ids: np.ndarray

    def __post_init__(self) -> None:
        ids = np.array(self.ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(
                f"filler must be a non-empty 1-D token array, got shape {ids.shape}; "
                "pass some filler text"
            )
        ids.setflags(write=False)  # shared by every sample (and cached): nobody may edit it
        object.__setattr__(self, "ids", ids)

    def __len__(self) -> int:
        return int(self.ids.size)

    @classmethod
    def from_text(cls, tok: Tokenizer, text: str) -> Filler:
        if not text:
            raise ValueError("filler text is empty: a haystack needs some text to cut from")
        ids = tok.encode(text)
        if not ids:
            raise ValueError(f"filler text {text[:40]!r} encodes to no tokens")
        return cls(np.asarray(ids, dtype=np.int64))

    @classmethod
    def stdlib(cls, tok: Tokenizer, max_bytes: int = 2_000_000) -> Filler:
        """The built-in corpus's train documents, in order, up to ``max_bytes``; cached."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes} must be positive")
        return _stdlib_filler(_ByFingerprint(tok), max_bytes)

    def take(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """A random contiguous span of ``n`` tokens (the array repeats when shorter than ``n``)."""
        if n < 0:
            raise ValueError(f"cannot take {n} filler tokens")
        size = self.ids.size
        if n <= size:
            start = int(rng.integers(0, size - n + 1))
            return self.ids[start : start + n].copy()
        start = int(rng.integers(0, size))
        return np.tile(self.ids, -(-(start + n) // size))[start : start + n]


class _ByFingerprint:
    """Hashes and compares a tokenizer by its fingerprint, so equal vocabularies share a cache."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.fingerprint = tok.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByFingerprint) and other.fingerprint == self.fingerprint


@functools.lru_cache(maxsize=2)
def _stdlib_text(max_bytes: int) -> bytes:
    # Reading the stdlib corpus takes seconds; every tokenizer of a process shares one read.
    parts, total = [], 0
    for doc in read_corpus("stdlib").train:
        if total >= max_bytes:
            break
        parts.append(doc.data)
        total += len(doc.data) + 1
    return b"\n".join(parts)[:max_bytes]


@functools.lru_cache(maxsize=4)
def _stdlib_filler(key: _ByFingerprint, max_bytes: int) -> Filler:
    raw = _stdlib_text(max_bytes)
    if isinstance(key.tok, ByteTokenizer):
        return Filler(key.tok.encode_array(raw))
    # The byte cut may split a character; the BPE reads text only.
    return Filler.from_text(key.tok, raw.decode("utf-8", errors="ignore"))
