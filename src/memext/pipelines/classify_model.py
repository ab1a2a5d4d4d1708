"""A long-document classifier: chunks -> encoder -> aggregator -> linear head.

``ClassifierHead`` standardises chunk embeddings, aggregates them and classifies the document
vector; ``Classifier`` joins it to its encoder, labels and config and predicts. The helpers
here chunk and embed documents as training and prediction both read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from memext.errors import MemextError
from memext.pipelines.aggregators import AggregatorSpec, build_aggregator
from memext.pipelines.chunking import Chunk, check_text, chunk_text
from memext.pipelines.classify_config import ClassifierConfig
from memext.pipelines.encoder import Encoder


class ClassifierHead(nn.Module):
    """Chunk embeddings ``(B, C, dim)`` and a ``(B, C)`` chunk mask -> logits ``(B, n_classes)``.

    Embeddings are first standardised with per-feature statistics of the training chunks
    (``shift``, ``scale``, saved with the weights): the unit vectors of a sentence encoder sit
    in a narrow cone, so the differences between documents are small next to what they share,
    and a linear head would otherwise need many steps just to scale them up.
    """

    def __init__(self, aggregator: nn.Module, dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.aggregator = aggregator
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, n_classes)

    def fit_stats(self, vectors: Tensor) -> None:
        """Standardise with the statistics of ``(N, dim)`` training chunk embeddings."""
        self.shift.copy_(vectors.mean(0))
        self.scale.copy_(vectors.std(0, unbiased=False).clamp(min=1e-6))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = (x - self.shift) / self.scale  # (B, C, dim)
        return self.out(self.dropout(self.aggregator(x, mask)))  # (B, n_classes)


def build_head(cfg: ClassifierConfig, dim: int, n_classes: int) -> ClassifierHead:
    spec = AggregatorSpec(dim, cfg.chunks_read, cfg.n_layers, cfg.n_heads, cfg.dropout)
    try:
        aggregator = build_aggregator(cfg.aggregator, spec)
    except ValueError as e:
        raise MemextError(f"cannot build the {cfg.aggregator} aggregator: {e}") from None
    return ClassifierHead(aggregator, dim, n_classes, cfg.dropout)


def pooled_embeddings(encoder: Encoder, chunks: Sequence[Chunk]) -> Tensor:
    """``(len(chunks), dim)`` embeddings with gradients, pooled as ``Encoder.embed_chunks``
    pools them, for fine-tuning."""
    return encoder.pool([encoder.wrap(c.token_ids) for c in chunks])


def pad_chunks(vectors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-document ``(n_i, dim)`` embeddings -> ``(B, C, dim)`` zero-padded and ``(B, C)`` mask."""
    x = nn.utils.rnn.pad_sequence(list(vectors), batch_first=True)  # (B, C, dim)
    lengths = torch.tensor([len(v) for v in vectors], device=x.device)
    mask = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(1)  # (B, C)
    return x, mask


class Classifier:
    """A trained classifier: its config, label names, encoder and head. See ``load_classifier``."""

    def __init__(
        self, cfg: ClassifierConfig, labels: list[str], encoder: Encoder, head: ClassifierHead
    ) -> None:
        self.cfg, self.labels, self.encoder, self.head = cfg, labels, encoder, head

    def chunks(self, texts: Sequence[str]) -> list[list[Chunk]]:
        """The chunks the model reads of each text (at most ``cfg.chunks_read``)."""
        return chunk_documents(as_texts(texts), self.encoder, self.cfg)[0]

    def embed(self, texts: Sequence[str]) -> list[Tensor]:
        """Each text's chunk embeddings, ``(n_chunks, dim)``."""
        return embed_documents(self.encoder, self.chunks(texts))

    def logits(self, vectors: Sequence[Tensor]) -> Tensor:
        """``(n, n_classes)`` logits of documents given as chunk embeddings."""
        self.head.eval()
        device = self.head.out.weight.device
        out = []
        with torch.no_grad():
            for b in range(0, len(vectors), self.cfg.batch_size):
                x, mask = pad_chunks([v.to(device) for v in vectors[b : b + self.cfg.batch_size]])
                out.append(self.head(x, mask).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), n_classes)`` class probabilities, columns in ``self.labels`` order."""
        return self.logits(self.embed(texts)).softmax(-1).numpy()

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most probable label of each text."""
        return [self.labels[i] for i in self.logits(self.embed(texts)).argmax(-1).tolist()]

    def __repr__(self) -> str:
        kind = "truncate" if self.cfg.truncate else self.cfg.aggregator
        return f"Classifier({kind}, labels={self.labels}, encoder={self.encoder.name!r})"


def open_encoder(
    cfg: ClassifierConfig, path: str | Path | None, *, progress: bool, cache: bool, device: str
) -> Encoder:
    # A fine-tuned encoder never uses the cache: its keys name the base weights, not these.
    return Encoder(
        path,
        max_tokens=cfg.max_tokens,
        cache=cache and cfg.frozen,
        progress=progress,
        device=device,
    )


def _spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` evenly spread, first and last included (all of them if n <= k)."""
    if n <= k:
        return list(range(n))
    return np.linspace(0, n - 1, k).round().astype(int).tolist()  # distinct, as n > k


def as_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a list of documents; wrap a single one as [text]")
    return list(texts)


def chunk_documents(
    texts: list[str], encoder: Encoder, cfg: ClassifierConfig
) -> tuple[list[list[Chunk]], int]:
    """The chunks the model reads of each text, and how many texts had more than it reads."""
    docs, n_over = [], 0
    for i, text in enumerate(texts):
        try:
            # the baseline's chunk is the first max_tokens tokens exactly, no boundary search
            chunks = chunk_text(
                check_text(text),
                encoder.tokenizer,
                encoder.max_tokens,
                0 if cfg.truncate else cfg.overlap,
                boundaries=not cfg.truncate,
            )
        except MemextError as e:
            raise MemextError(f"document {i}: {e}") from None
        n_over += len(chunks) > cfg.chunks_read
        docs.append([chunks[j] for j in _spread(len(chunks), cfg.chunks_read)])
    return docs, n_over


def embed_documents(encoder: Encoder, docs: list[list[Chunk]]) -> list[Tensor]:
    """Each document's chunk embeddings, ``(n_i, dim)``, in one ``embed_chunks`` call (batched
    across documents, cached when the encoder is frozen)."""
    encoder.model.eval()
    flat = [c for doc in docs for c in doc]
    vectors = torch.from_numpy(encoder.embed_chunks(flat))  # (sum n_i, dim)
    return list(torch.split(vectors, [len(doc) for doc in docs]))
