"""The settings of a long-document classifier run, stored in its ``classifier.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memext.pipelines.aggregators import AGGREGATORS


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything a classifier run is built and trained from; stored in ``classifier.json``.

    Args:
        encoder: a local Hugging Face encoder folder; None for the bundled all-MiniLM-L6-v2.
        aggregator: how chunk embeddings become a document vector (``AGGREGATORS``). ``mean``
            by default: on real documents with ~100 examples a class it beat the learned ones
            (docs/results.md#documents).
        truncate: the baseline: read only the first chunk (the first ``max_tokens`` tokens).
        frozen: train only the head on cached embeddings; False fine-tunes the encoder too.
        max_tokens: tokens per chunk, special tokens included; None for the encoder's limit.
        overlap: tokens each chunk shares with the next.
        max_chunks: the most chunks read per document; a longer document is read as
            ``max_chunks`` chunks spread evenly over it, its first and last included. It bounds
            memory when fine-tuning (a step runs up to ``batch_size * max_chunks`` chunks
            through the encoder with gradients) and sets the transformer aggregator's positions.
        epochs, lr, weight_decay, batch_size: of AdamW on the head (documents per batch).
        encoder_lr: the encoder's learning rate when fine-tuning.
        dropout: before the linear layer, and inside the transformer aggregator.
        n_layers, n_heads: of the transformer aggregator.
        seed: weights, shuffling and dropout; equal seeds give equal runs.
    """

    encoder: str | None = None
    aggregator: str = "mean"
    truncate: bool = False
    frozen: bool = True
    max_tokens: int | None = None
    overlap: int = 0
    max_chunks: int = 32
    epochs: int = 10
    lr: float = 1e-3
    encoder_lr: float = 2e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    # The aggregators' own defaults (the transformer aggregator's, for dropout).
    dropout: float = AGGREGATORS.default("dropout")
    n_layers: int = AGGREGATORS.default("n_layers")
    n_heads: int = AGGREGATORS.default("n_heads")
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.encoder, Path):  # stored as JSON: keep it a string
            object.__setattr__(self, "encoder", str(self.encoder))
        if self.aggregator not in AGGREGATORS:
            raise ValueError(
                f"aggregator={self.aggregator!r} is unknown: expected "
                + AGGREGATORS.accepted(self.aggregator)
            )
        positive = ("max_chunks", "epochs", "batch_size", "n_layers", "n_heads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} is invalid: expected >= 1 or None")
        if self.overlap < 0:
            raise ValueError(f"overlap={self.overlap} is invalid: expected >= 0")
        for name in ("lr", "encoder_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} is invalid: expected >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} is invalid: expected 0 <= dropout < 1")

    @property
    def chunks_read(self) -> int:
        """The most chunks the model reads per document."""
        return 1 if self.truncate else self.max_chunks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown classifier settings {unknown}; known: {sorted(known)}")
        return cls(**d)
