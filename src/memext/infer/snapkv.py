"""The ``snapkv`` KV-cache policy: the end of a prompt votes which of its keys and values to keep
(SnapKV, Li et al. 2024).

The prompt is read with every key and value, as ``full`` reads it, so the prompt's own logits
(and the first token generated) are full attention's. The prompt ends at the first forward of a
single token (the first decoded token). Before that token is read, each layer keeps, per KV
head, ``budget`` of the P prompt tokens when P > ``budget`` (otherwise all of them):

- the observation ``window``: the prompt's last W tokens;
- the first ``sinks`` tokens (attention sinks, as StreamingLLM keeps them);
- the ``budget - W - sinks`` other prefix tokens with the most votes. A prefix token's votes,
  per query head: the softmax attention weight it gets from each of the W window queries
  (causal, over all P keys, scaled by 1/√D as the model attends), summed over the window, then
  pooled along the keys, a 1-D ``pool`` ("avg" or "max") of odd width ``kernel``, centred,
  stride 1, zero-padded ("avg" divides by ``kernel`` at the edges too), so that a token's
  neighbours come along with it (an answer spans several tokens); then summed over the query
  heads that share the KV head (GQA). Ties go to ``torch.topk``'s choice.

Decoding then appends every new token. Kept keys keep their true rotary positions (they are
stored rotated, as ``full`` stores them); only which keys a query sees changes. So with
``budget`` >= P the policy computes exactly what ``full`` computes. The queries come with each
forward (``reads_queries``); the last W are held until the prompt ends.

Reading that never has a one-token forward (a stream scored chunk by chunk) never ends its
prompt, and is full attention. A prompt whose last forward is one token long ends one token
early (its last token is read against the compressed cache); a prompt read one token at a time
ends at its first token, so nothing is ever dropped.

Bytes held, ``nbytes()`` (L layers, B batch, H KV heads, H_q query heads, D head_dim, e bytes
per element, M = ``max_len``, W = ``window``, P the prompt's tokens):

- while the prompt is read: ``L·B·(2·H·M·D·e + H_q·min(W, read)·D·e)`` (the prompt in full,
  as ``full``, and the window's queries);
- after it, when P > ``budget``: ``2·L·B·H·(budget + M − P)·D·e`` (the kept tokens and room for
  the M − P tokens still allowed); otherwise ``2·L·B·H·M·D·e``.

At a 20% budget of a long prompt and a short answer, decoding works from about a fifth of the
bytes of ``full``. Not counted: the vote's transient scores, H_q·W·P fp32 values per layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from memext.infer.cache import (
    CachePolicy,
    Heads,
    _check_fits,
    _check_positive,
    layer_heads,
    register_cache,
)

#: Defaults: the observation window and the sinks kept (SnapKV's window is 32).
WINDOW = 32
SINKS = 4
POOLS = ("avg", "max")


def votes(queries: Tensor, keys: Tensor, kernel: int, pool: str = "avg") -> Tensor:
    """Each prefix token's votes (module doc).

    Args:
        queries: (B, H_q, W, D), the prompt's last W queries, rotated as the model rotates them.
        keys: (B, H, P, D), all P prompt keys, rotated; H divides H_q, query head i reads KV head
            i // (H_q / H).
    Returns:
        (B, H, P - W) fp32 votes of tokens [0, P - W).
    """
    b, hq, w, d = queries.shape
    h, p = keys.shape[1], keys.shape[2]
    g = hq // h
    q = queries.float().reshape(b, h, g * w, d)
    logits = (q @ keys.float().transpose(-1, -2) / math.sqrt(d)).view(b, h, g, w, p)
    key_pos = torch.arange(p, device=keys.device)
    query_pos = torch.arange(p - w, p, device=keys.device)
    logits = logits.masked_fill(key_pos[None] > query_pos[:, None], float("-inf"))
    summed = logits.softmax(dim=-1)[..., : p - w].sum(dim=3)  # (B, H, g, P - W)
    flat = summed.reshape(b * h * g, 1, p - w)
    if pool == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.view(b, h, g, p - w).sum(dim=2)


def keep_index(scores: Tensor, n_prompt: int, budget: int, window: int, sinks: int) -> Tensor:
    """(B, H, budget) ascending positions to keep of a prompt of ``n_prompt`` > ``budget`` tokens
    whose prefix tokens [0, n_prompt - window) have ``scores`` (B, H, n_prompt - window)."""
    b, h, prefix = scores.shape
    s = min(sinks, prefix)
    chosen = scores[..., s:].topk(budget - window - s, dim=-1).indices + s
    fixed = torch.cat((torch.arange(s), torch.arange(prefix, n_prompt))).to(scores.device)
    return torch.cat((fixed.expand(b, h, -1), chosen), dim=-1).sort(dim=-1).values


@register_cache("snapkv")
class SnapKV(CachePolicy):
    """The prompt's observation window keeps ``budget`` tokens per KV head (see the module doc)."""

    reads_queries = True

    def __init__(
        self,
        budget: int | None = None,
        window: int = WINDOW,
        kernel: int = 7,
        sinks: int = SINKS,
        pool: str = "max",
        max_len: int | None = None,
    ) -> None:
        _check_positive(budget=budget, window=window, kernel=kernel, max_len=max_len)
        if kernel % 2 == 0:
            raise ValueError(
                f"snapkv kernel must be odd (a pool centred on each token), got kernel={kernel}"
            )
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"snapkv sinks must be a number of tokens >= 0, got sinks={sinks!r}")
        if budget < sinks + window:
            raise ValueError(
                f"snapkv budget={budget} must hold the sinks and the observation window: "
                f"choose budget >= sinks + window = {sinks + window}"
            )
        if pool not in POOLS:
            raise ValueError(f"snapkv pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.budget, self.window, self.kernel, self.sinks = budget, window, kernel, sinks
        self.pool, self.max_len = pool, max_len

    @classmethod
    def covering(cls, tokens: int) -> dict[str, Any]:
        return {"budget": max(tokens, SINKS + WINDOW)}  # every prompt token is kept

    def make_layer(
        self,
        batch: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> SnapLayer:
        return SnapLayer(self, batch, n_heads, head_dim, dtype, device)

    def allocate(
        self,
        n_layers: int,
        batch: int,
        n_heads: Heads,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> SnapCache:
        heads = layer_heads(n_heads, n_layers)  # per layer: a pruned model's may differ
        return SnapCache([self.make_layer(batch, h, head_dim, dtype, device) for h in heads])


class SnapLayer:
    """One layer's keys and values (rotated, at their true positions) and, while the prompt is
    read, its last ``window`` queries.

    ``step(start, k, v, q)`` takes the chunk's keys and values (B, H, T, D) and queries
    (B, H_q, T, D), all rotated, ``start`` tokens read before it; it returns every key and value
    the chunk attends to (those kept, then the chunk) and stores the chunk.
    """

    def __init__(
        self,
        policy: SnapKV,
        batch: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.policy = policy
        shape = (batch, n_heads, policy.max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.held = 0  # tokens in k and v
        self.prompt = True  # until the first one-token forward
        self.window_q: Tensor | None = None

    def held_after(self, t: int) -> int:
        """Tokens a forward of ``t`` tokens finds held (the prompt is cut before a first single
        token is read)."""
        if self.prompt and t == 1 and self.held > self.policy.budget:
            return self.policy.budget
        return self.held

    def step(self, start: int, k: Tensor, v: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        t = k.shape[-2]
        if q.shape[-2] != t or q.shape[1] % k.shape[1]:
            raise ValueError(
                f"the snapkv cache needs this chunk's queries: got queries {tuple(q.shape)} for "
                f"keys {tuple(k.shape)} (B, heads, T, head_dim; query heads a multiple of key "
                "heads)"
            )
        _check_fits(start + t, self.policy.max_len)
        if self.prompt and t == 1:
            self.prompt = False
            if self.held > self.policy.budget:
                self._compress(start)
            self.window_q = None
        n = self.held
        self.k[..., n : n + t, :] = k
        self.v[..., n : n + t, :] = v
        self.held = n + t
        if self.prompt:
            w = self.policy.window
            seen = q if self.window_q is None else torch.cat((self.window_q, q), dim=-2)
            self.window_q = seen[..., -w:, :].clone()  # a copy: not a view of a whole chunk
        return self.k[..., : n + t, :], self.v[..., : n + t, :]

    def _compress(self, start: int) -> None:
        """Keep ``budget`` of the ``start`` prompt tokens; room for the rest of ``max_len``."""
        p = self.policy
        keys, values = self.k[..., :start, :], self.v[..., :start, :]
        scores = votes(self.window_q, keys, p.kernel, p.pool)
        index = keep_index(scores, start, p.budget, p.window, p.sinks)  # (B, H, budget)
        b, h, _, d = keys.shape
        room = p.budget + p.max_len - start
        new_k = keys.new_zeros(b, h, room, d)
        new_v = values.new_zeros(b, h, room, d)
        at = index[..., None].expand(-1, -1, -1, d)
        new_k[..., : p.budget, :] = keys.gather(2, at)
        new_v[..., : p.budget, :] = values.gather(2, at)
        self.k, self.v, self.held = new_k, new_v, p.budget

    def nbytes(self) -> int:
        held = (self.k, self.v) + ((self.window_q,) if self.window_q is not None else ())
        return sum(x.numel() * x.element_size() for x in held)


class SnapCache:
    """memext's cache contract over a ``SnapLayer`` per model layer: keys come in rotated, with
    the chunk's rotated queries (``reads_queries``), and go out at their true positions."""

    reads_queries = True
    unbounded = False

    def __init__(self, layers: list[SnapLayer]):
        self.layers = layers
        self.seq_len = 0

    def update(
        self, layer: int, k: Tensor, v: Tensor, queries: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if queries is None:
            raise ValueError(
                "the snapkv cache votes with the prompt's last queries: pass "
                "update(layer, k, v, queries=q) (memext's attention does when the cache has "
                "reads_queries)"
            )
        return self.layers[layer].step(self.seq_len, k, v, queries)

    def mask(self, t: int) -> None:
        return None  # plain causal: the chunk sits after every key kept

    def advance(self, t: int) -> None:
        self.seq_len += t

    def nbytes(self) -> int:
        """Bytes held (the formulas are in the module doc; they drop when the prompt ends)."""
        return sum(layer.nbytes() for layer in self.layers)
