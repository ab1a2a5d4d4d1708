"""Chunked local attention (Llama 4's ``attention_chunk_size``): positions are cut into chunks of
``window`` tokens and a query sees only the keys of its own chunk.

Position i is in chunk ``i // window``. Causal: query i sees keys ``(i // W) * W .. i``, so the
first token of every chunk sees itself alone; bidirectional: every key of its chunk. Unlike
``sliding``, a query's context shrinks back to one token at each chunk boundary, which is what
lets a model of this kind interleave chunked layers with full ones and keep no cache beyond the
current chunk. ``memext.nn.reference.chunked_mask`` is the rule written out densely.

How it is fast: the sequence, padded up to whole chunks, is viewed as (B, H, chunks, W, D) and
one SDPA call attends within every chunk at once (causal: SDPA's own causal path, so no mask is
built). Time and memory grow as T·W. A few queries at the end of longer keys (decoding, chunked
prefill) slice the keys from their first query's chunk start and take one masked call.
``key_padding`` (``(B, Tk)``, True = real) hides keys; a query left with no visible key gets a
zero output (SDPA's convention), where the reference formula gives NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memext.nn.attention import AttentionKernel, check_inputs, register_attention
from memext.registry import check_int


@register_attention("chunked")
class ChunkedAttention(AttentionKernel):
    """Attention within fixed chunks of ``window`` tokens (see the module docstring)."""

    def __init__(self, window: int = 256) -> None:
        super().__init__()
        self.check(window)
        self.window = window

    @classmethod
    def check(cls, window: int) -> None:
        check_int(cls.name, "window", window, 1)

    def extra_repr(self) -> str:
        return f"window={self.window}"

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = True,
        key_padding: Tensor | None = None,
    ) -> Tensor:
        check_inputs("chunked", q, k, v, key_padding)
        tq, tk = q.shape[-2], k.shape[-2]
        if tq < tk:
            return self._tail(q, k, v, causal, key_padding)
        b, h, t, d = q.shape
        w = self.window
        n = -(-t // w)
        pad = n * w - t
        # Padded keys sit after every real query: causal masking alone hides them.
        q, k, v = (F.pad(x, (0, 0, 0, pad)).view(b, h, n, w, d) for x in (q, k, v))
        mask = None
        if key_padding is not None or (pad and not causal):
            real = torch.ones(b, t, dtype=torch.bool, device=q.device)
            if key_padding is not None:
                real = key_padding.to(torch.bool)
            mask = F.pad(real, (0, pad)).view(b, 1, n, 1, w)
            if causal:
                tri = torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
                mask = mask & tri
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None
        )
        return out.reshape(b, h, n * w, d)[:, :, :t]

    def _tail(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding: Tensor | None
    ) -> Tensor:
        """Queries at the last Tq of Tk positions: only keys from the first query's chunk on."""
        tq, tk = q.shape[-2], k.shape[-2]
        start = (tk - tq) // self.window * self.window
        q_pos = torch.arange(tk - tq, tk, device=q.device)[:, None]
        k_pos = torch.arange(start, tk, device=q.device)[None, :]
        mask = q_pos // self.window == k_pos // self.window
        if causal:
            mask = mask & (k_pos <= q_pos)
        if key_padding is not None:
            mask = mask & key_padding[:, None, None, start:].to(torch.bool)
        return F.scaled_dot_product_attention(q, k[:, :, start:], v[:, :, start:], attn_mask=mask)
