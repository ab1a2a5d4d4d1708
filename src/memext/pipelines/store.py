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

The store is built in three files: ``store_db.py`` (the SQLite file: schema, opening, the
model it records, errors), ``store_write.py`` (adding chunks and replacing documents) and
``store_search.py`` (the in-memory index and ``search``); ``RetrievalStore`` here joins them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from memext.errors import MemextError
from memext.pipelines.store_db import (
    BUSY_TIMEOUT,
    FORMAT,
    StoreError,
    StoreFile,
    require_store,
    store_error,
)
from memext.pipelines.store_search import INDEXES, MODES, Hit, StoreSearch
from memext.pipelines.store_write import STAGE_BATCH, Item, Replaced, StoreWriter, content_key

if TYPE_CHECKING:
    from memext.pipelines.encoder import Encoder

__all__ = [
    "BUSY_TIMEOUT",
    "FORMAT",
    "INDEXES",
    "MODES",
    "STAGE_BATCH",
    "Hit",
    "Item",
    "Replaced",
    "RetrievalStore",
    "StoreError",
    "StoreFile",
    "content_key",
    "require_store",
    "store_error",
]


class RetrievalStore(StoreWriter, StoreSearch):
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
        self.encoder = encoder
        self.index = index
        self.ef_search = ef_search
        super().__init__(
            path, model=model, dim=dim, fingerprint=fingerprint, readonly=readonly, create=create
        )
        self._init_index()

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> RetrievalStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RetrievalStore({self.path!r}, model={self.model!r}, dim={self.dim})"
