"""Memory-mapped token stores, built once per (corpus, tokenizer) and cached by content hash."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memext.data.corpus import Corpus
from memext.io import atomic_write, atomic_write_text
from memext.tokenizer import Tokenizer, encode_documents


def cache_dir() -> Path:
    """``$MEMEXT_CACHE``, else ``~/.cache/memext``."""
    return Path(os.environ.get("MEMEXT_CACHE", Path.home() / ".cache" / "memext")).expanduser()


@dataclass(frozen=True)
class TokenStore:
    train: np.ndarray  # memory-mapped 1-D id streams, documents separated by <eod>
    validation: np.ndarray
    corpus_hash: str
    key: str

    def split(self, name: str) -> np.ndarray:
        return {"train": self.train, "validation": self.validation}[name]


def build_store(corpus: Corpus, tok: Tokenizer, root: Path | None = None) -> TokenStore:
    """Tokenize ``corpus`` into ``root/tokens/KEY/{train,validation}.bin`` unless already there.

    KEY hashes the corpus contents and the tokenizer, so a changed source builds a new store.
    """
    corpus_hash = corpus.fingerprint
    key = hashlib.sha256(f"{corpus_hash}:{tok.fingerprint()}".encode()).hexdigest()[:24]
    folder = (root or cache_dir()) / "tokens" / key
    meta_path = folder / "meta.json"
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    if not meta_path.is_file():
        sizes = {}
        for split, docs in (("train", corpus.train), ("validation", corpus.validation)):
            ids = encode_documents(tok, [d.data for d in docs]).astype(dtype)
            atomic_write(folder / f"{split}.bin", ids.tofile)
            sizes[split] = int(ids.size)
        # meta.json is written last: its presence marks a complete store.
        atomic_write_text(
            meta_path,
            json.dumps(
                {
                    "corpus_hash": corpus_hash,
                    "tokenizer": tok.fingerprint(),
                    "dtype": np.dtype(dtype).name,
                    "sizes": sizes,
                }
            ),
        )
    meta = json.loads(meta_path.read_text())
    arrays = {
        split: np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))
        for split, n in meta["sizes"].items()
    }
    return TokenStore(arrays["train"], arrays["validation"], corpus_hash, key)
