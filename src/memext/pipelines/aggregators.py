"""Aggregators: one vector per document from the embeddings of its chunks.

The contract (``Aggregator``): ``forward(x, mask)`` takes chunk embeddings ``x`` of shape
``(B, C, dim)`` and a ``(B, C)`` bool ``mask`` (True for a real chunk, False for padding) and
returns ``(B, dim)``. A padded chunk must change nothing, whatever its values. Each aggregator
registers itself in ``AGGREGATORS`` by the name a classifier config uses; a new one is a new
class with ``@register("name")`` and nothing else changes. ``build_aggregator`` gives it the
fields of an ``AggregatorSpec`` its ``__init__`` names, whose defaults are the aggregators'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from memext.registry import Registry


class Aggregator(nn.Module):
    """``(B, C, dim)`` chunk embeddings and a ``(B, C)`` mask of real chunks -> ``(B, dim)``."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError


AGGREGATORS: Registry[type[Aggregator]] = Registry("aggregator")
register = AGGREGATORS.register


@register("mean")
class MeanPool(Aggregator):
    """The average of the real chunks: a long document read as a bag of chunks."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1)  # (B, C, 1)
        total = torch.where(m, x, 0.0).sum(1)  # (B, dim); where(): 0 * nan would be nan
        return total / m.sum(1).clamp(min=1).to(x.dtype)


@register("max")
class MaxPool(Aggregator):
    """The feature-wise maximum over real chunks: one chunk can carry the decision alone."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)  # (B, dim)


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over C of ``(B, C)`` scores, exactly 0 on padding."""
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


@register("attention")
class AttentionPool(Aggregator):
    """Learned attention pooling (Ilse et al., 2018): a small MLP scores each chunk, and the
    document is the softmax-weighted sum, so training learns which chunks to listen to.

    ``n_heads`` independent scorings are pooled and projected back to ``dim``: with one, the
    scorer can lock onto the chunks of whichever class it learned first and attend to noise in
    the other documents; several heads let each kind of decisive chunk find a head of its own.
    """

    def __init__(self, dim: int, n_heads: int = 4, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.n_heads = n_heads
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, n_heads))
        self.proj = nn.Linear(n_heads * dim, dim)

    def weights(self, x: Tensor, mask: Tensor) -> Tensor:
        """``(B, n_heads, C)`` attention over chunks, summing to 1 over the real ones."""
        scores = self.score(x).transpose(1, 2)  # (B, n_heads, C)
        return _masked_softmax(scores, mask.unsqueeze(1))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        w = self.weights(x, mask)  # (B, H, C)
        # zeroed, not just weighted 0: a padded chunk's inf or nan would leak in as 0 * inf
        x = torch.where(mask.unsqueeze(-1), x, 0.0)  # (B, C, dim)
        pooled = w @ x  # (B, H, dim)
        return self.proj(pooled.flatten(1))  # (B, dim)


@register("transformer")
class TransformerPool(Aggregator):
    """A small Transformer over the chunk sequence: chunks see each other (and their order,
    through learned chunk positions); a [CLS] vector prepended to them reads the document out.

    Args:
        dim: chunk embedding size (the model width; ``n_heads`` must divide it).
        max_chunks: the longest chunk sequence (the number of learned positions).
        n_layers, n_heads, dropout: of the ``nn.TransformerEncoder``.
    """

    def __init__(
        self, dim: int, max_chunks: int, n_layers: int = 1, n_heads: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(
                f"n_heads={n_heads} does not divide the embedding size {dim}; "
                f"choose one of {[h for h in range(1, 17) if dim % h == 0]}"
            )
        self.max_chunks = max_chunks
        self.cls = nn.Parameter(torch.randn(dim) * 0.02)
        self.positions = nn.Parameter(torch.randn(max_chunks, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, n_heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # no nested tensors: padded and unpadded batches then take the same code path
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)  # pre-norm layers leave the output unnormalised

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, C, _ = x.shape
        if self.max_chunks < C:
            raise ValueError(f"{C} chunks, but this aggregator has {self.max_chunks} positions")
        # zeroed padding: a nan or inf there would otherwise poison the attention's matmul
        x = torch.where(mask.unsqueeze(-1), x + self.positions[:C], 0.0)  # (B, C, dim)
        h = torch.cat([self.cls.expand(B, 1, -1), x], dim=1)  # (B, 1 + C, dim)
        keep = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # (B, 1 + C)
        h = self.encoder(h, src_key_padding_mask=~keep)  # (B, 1 + C, dim)
        return self.norm(h[:, 0])  # (B, dim)


@dataclass(frozen=True)
class AggregatorSpec:
    """What an aggregator may need to know: the embedding size and the longest chunk sequence.

    ``n_layers``, ``n_heads`` and ``dropout`` are read only by aggregators with layers of their
    own (``transformer``, ``attention``); their defaults are those aggregators'.
    """

    dim: int
    max_chunks: int
    n_layers: int = AGGREGATORS.default("n_layers")
    n_heads: int = AGGREGATORS.default("n_heads")
    dropout: float = AGGREGATORS.default("dropout")


def build_aggregator(name: str, spec: AggregatorSpec) -> Aggregator:
    """The aggregator registered as ``name``, given the fields of ``spec`` it takes."""
    return AGGREGATORS.build(name, asdict(spec))
