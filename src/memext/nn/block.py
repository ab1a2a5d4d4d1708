"""A pre-norm Transformer block: x + attn(norm(x)), then x + ffn(norm(x)).

The same block serves reversible models, which combine its two branches differently
(``memext.nn.reversible``); parameters and their names are the same either way.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from memext.nn.attention import AttentionKernel
from memext.nn.memory import MemoryStep
from memext.nn.rotary import apply_rotary


class SelfAttention(nn.Module):
    """Projections + rotary + a pluggable kernel; the kernel decides which keys each query sees."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        kernel: AttentionKernel,
        dropout: float = 0.0,
        causal: bool = True,
        head_dim: int | None = None,
    ):
        """``head_dim``: default d_model // n_heads; a layer whose heads were pruned keeps the
        original head_dim with fewer heads (its projections are n_heads * head_dim wide)."""
        super().__init__()
        # False in an encoder: every position sees the keys the kernel's pattern allows on both
        # sides. A KV cache (decoding) needs causal attention.
        self.causal = causal
        self.n_heads = n_heads
        self.head_dim = head_dim or d_model // n_heads
        width = n_heads * self.head_dim
        # qkv's rows are [q of each head | k of each head | v of each head], head_dim rows a head.
        self.qkv = nn.Linear(d_model, 3 * width, bias=False)
        self.out = nn.Linear(width, d_model, bias=False)
        self.kernel = kernel
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: Any = None,
        layer: int = 0,
        memory: MemoryStep | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim)
        q_raw, k_raw, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        q, k = apply_rotary(q_raw, cos, sin), apply_rotary(k_raw, cos, sin)
        if self.kernel.shared_qk:
            k = q
        mask = None
        if cache is not None:
            rotates = getattr(cache, "rotates_keys", False)
            # A cache that chooses what to return by the queries (retrieval) is given them, in
            # the rotation its keys come in.
            extra = (
                {"queries": q_raw if rotates else q}
                if getattr(cache, "reads_queries", False)
                else {}
            )
            if rotates:
                # The cache places keys at its own positions (sinks) and rotates them on read.
                k, v = cache.update(layer, q_raw if self.kernel.shared_qk else k_raw, v, **extra)
            else:
                k, v = cache.update(layer, k, v, **extra)  # (B, H, T_cache + T, D)
            mask = cache.mask(t) if hasattr(cache, "mask") else None
        if mask is not None:
            # The cache's band (a chunk reaching past a window) replaces the kernel's causal rule;
            # a cache comes only with memory "none", whose attend is the kernel.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif memory is None:
            y = self.kernel(q, k, v, causal=self.causal)  # (B, H, T, D)
        else:
            y = memory.attend(layer, q, k, v, self.kernel, q_raw, k_raw)
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.dropout(self.out(y))


class Block(nn.Module):
    def __init__(self, attn: SelfAttention, ffn: nn.Module, d_model: int, norm_eps: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = attn
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn = ffn

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: Any = None,
        layer: int = 0,
        memory: MemoryStep | None = None,
    ) -> Tensor:
        x = x + self.attn_branch(x, cos, sin, cache, layer, memory)
        return x + self.ffn_branch(x)

    # The two residual branches on their own: the reversible stack (memext.nn.reversible) couples
    # them across two streams instead of adding both to one.
    def attn_branch(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: Any = None,
        layer: int = 0,
        memory: MemoryStep | None = None,
    ) -> Tensor:
        """attn(norm(x)): what this block's attention adds to the residual stream."""
        return self.attn(self.attn_norm(x), cos, sin, cache, layer, memory)

    def ffn_branch(self, x: Tensor) -> Tensor:
        """ffn(norm(x)): what this block's feed-forward adds to the residual stream."""
        return self.ffn(self.ffn_norm(x))
