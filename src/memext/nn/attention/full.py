"""Exact attention through PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memext.nn.attention import AttentionKernel, register_attention


@register_attention("full")
class FullAttention(AttentionKernel):
    """Dense attention; the causal square case takes SDPA's ``is_causal=True`` fast path."""

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = True,
        key_padding: Tensor | None = None,
    ) -> Tensor:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = None if key_padding is None else key_padding[:, None, None, :]
        if causal and tq > 1:  # one query at the end sees every key
            if tq == tk and mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            # Chunked prefill / cached decode of several tokens: queries sit at the end of the keys.
            tri = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
            mask = tri if mask is None else mask & tri
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
