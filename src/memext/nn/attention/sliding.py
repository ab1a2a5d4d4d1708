"""Sliding-window attention with optional dilation and global tokens, exact and linear in length.

Who sees whom (position i is a query, j a key; ``memext.nn.reference.sliding_mask`` is the rule
written out densely):

- causal, window W: j in i-W+1 .. i (W keys, itself included);
- bidirectional, window W: |i - j| <= W/2 (Hugging Face Longformer's ``attention_window``);
- dilation d: the same count of keys, every d-th position (j ≡ i mod d);
- ``global_tokens`` g: keys 0..g-1 are seen by every query (causal: by every later query, like
  attention sinks); bidirectional global queries 0..g-1 also see every key.

How it is fast. The sequence is cut into query blocks of ``block`` tokens. Every block in the
middle of the sequence needs the same relative span of keys, so those spans are taken as an
overlapping strided *view* of K and V (``unfold``, no copy) and all blocks go through one SDPA call
that shares a single (block, span) band mask; PyTorch's fused kernel then never materialises
scores, in forward or backward. The few queries at either end, whose spans are cut off by the
sequence edge or overlap the global tokens, take one small dense-masked SDPA call each. Time and
memory grow as T·(W + block), never T². Dilation runs the undilated kernel on each residue class
(positions ≡ r mod d), where the dilated window becomes a contiguous one.

Cached decoding (fewer queries than keys) slices the keys the queries can see and runs one masked
SDPA call over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memext.nn.attention import AttentionKernel, register_attention


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@register_attention("sliding")
class SlidingWindowAttention(AttentionKernel):
    def __init__(
        self, window: int = 256, dilation: int = 1, global_tokens: int = 0, block: int = 0
    ) -> None:
        super().__init__()
        for name, value, least in (("window", window, 1), ("dilation", dilation, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"sliding attention: {name}={value!r} must be an integer >= 1")
        if global_tokens < 0:
            raise ValueError(f"sliding attention: global_tokens={global_tokens} must be >= 0")
        if dilation > 1 and global_tokens:
            raise ValueError(
                "sliding attention: dilation > 1 with global_tokens is not supported "
                "(global keys do not belong to one residue class); use one or the other"
            )
        self.window = window
        self.dilation = dilation
        self.global_tokens = global_tokens
        # Measured on CPU: a quarter of the window keeps per-block overhead low while wasting
        # little compute on the masked corners of each span.
        self.block = block or min(256, max(16, 1 << max(0, (window // 4).bit_length() - 1)))

    def extra_repr(self) -> str:
        return f"window={self.window}, dilation={self.dilation}, global_tokens={self.global_tokens}"

    def _reach(self, causal: bool) -> tuple[int, int]:
        """How far back and forward (in positions of one residue class) a query sees."""
        if causal:
            return self.window - 1, 0
        return self.window // 2, self.window // 2

    def _visible(self, q_pos: Tensor, k_pos: Tensor, causal: bool, globals_: bool) -> Tensor:
        """Dense rule for given positions (within one residue class): (len(q_pos), len(k_pos))."""
        lo, hi = self._reach(causal)
        i, j = q_pos[:, None], k_pos[None, :]
        seen = (j >= i - lo) & (j <= i + hi)
        g = self.global_tokens
        if globals_ and g:
            seen |= ((j < g) & (j <= i)) if causal else ((j < g) | (i < g))
        return seen

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = True,
        key_padding: Tensor | None = None,
    ) -> Tensor:
        if key_padding is not None:
            raise ValueError(
                "sliding attention does not take key_padding; use attention='full' or "
                "'block_sparse' for padded batches"
            )
        if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
            raise ValueError(
                f"sliding attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                "do not match"
            )
        tq, tk = q.shape[-2], k.shape[-2]
        if tq != tk:
            return self._cached(q, k, v, causal)
        if self.dilation == 1:
            return self._banded(q, k, v, causal)
        return self._dilated(q, k, v, causal)

    # --- decoding: a few queries at the end of a long cache -----------------------------------
    def _cached(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        if not causal:
            raise ValueError("sliding attention: fewer queries than keys needs causal=True")
        tq, tk = q.shape[-2], k.shape[-2]
        g, d = self.global_tokens, self.dilation
        start = max(g, tk - tq - (self.window - 1) * d)  # earliest key any query can see
        k_pos = torch.cat(
            [torch.arange(g, device=q.device), torch.arange(start, tk, device=q.device)]
        )
        q_pos = torch.arange(tk - tq, tk, device=q.device)
        same_class = (q_pos[:, None] - k_pos[None, :]) % d == 0
        mask = same_class & self._visible(q_pos // d, k_pos // d, True, globals_=False)
        mask &= k_pos[None, :] <= q_pos[:, None]
        if g:
            mask |= (k_pos[None, :] < g) & (k_pos[None, :] <= q_pos[:, None])
        idx_k, idx_v = k.index_select(-2, k_pos), v.index_select(-2, k_pos)
        return F.scaled_dot_product_attention(q, idx_k, idx_v, attn_mask=mask)

    # --- dilation: one undilated problem per residue class ------------------------------------
    def _dilated(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        d, t = self.dilation, q.shape[-2]
        pad = _round_up(t, d) - t
        if pad and not causal:
            raise ValueError(
                f"sliding attention: bidirectional dilation={d} needs a length divisible by it "
                f"(got {t}); pad the batch"
            )
        if pad:  # causal: keys after the end are never visible to real queries
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        b, h, tp, dh = q.shape

        def split(x: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H*d, T/d, D), class r = pos % d
            return x.view(b, h, tp // d, d, dh).transpose(2, 3).reshape(b, h * d, tp // d, dh)

        out = self._banded(split(q), split(k), split(v), causal)
        out = out.view(b, h, d, tp // d, dh).transpose(2, 3).reshape(b, h, tp, dh)
        return out[:, :, :t]

    # --- the main path ------------------------------------------------------------------------
    def _banded(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        t, dev = q.shape[-2], q.device
        g, blk = self.global_tokens, self.block
        lo, hi = self._reach(causal)
        span_lo, span_hi = _round_up(lo, blk), _round_up(hi, blk)
        # Middle blocks start where no span is cut by the start nor touches the global keys.
        m0 = max(span_lo, g + lo if g else 0)
        n_mid = max(0, (t - span_hi - m0) // blk)
        if n_mid < 2:  # short sequence: one dense-masked call is cheapest
            pos = torch.arange(t, device=dev)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self._visible(pos, pos, causal, globals_=True)
            )
            return out
        m1 = m0 + n_mid * blk
        parts = [self._edge(q, k, v, 0, m0, causal)]

        span = span_lo + blk + span_hi
        rows, cols = torch.arange(blk, device=dev), torch.arange(span, device=dev)
        band = self._visible(rows + span_lo, cols, causal, globals_=False)
        b, h, _, dh = q.shape
        q_mid = q[:, :, m0:m1].reshape(b * h, n_mid, blk, dh)
        k_mid, v_mid = (
            x[:, :, m0 - span_lo : m1 + span_hi].unfold(2, span, blk).transpose(-1, -2)
            for x in (k, v)
        )
        k_mid, v_mid = k_mid.reshape(b * h, n_mid, span, dh), v_mid.reshape(b * h, n_mid, span, dh)
        if g:  # every middle query sees the global keys; none of them is inside its band
            k_mid, v_mid = (
                torch.cat([x[:, :, :g].reshape(b * h, 1, g, dh).expand(-1, n_mid, -1, -1), m], 2)
                for x, m in ((k, k_mid), (v, v_mid))
            )
            band = torch.cat([band.new_ones(blk, g), band], 1)
        mid = F.scaled_dot_product_attention(q_mid, k_mid, v_mid, attn_mask=band)
        parts.append(mid.reshape(b, h, m1 - m0, dh))
        if m1 < t:
            parts.append(self._edge(q, k, v, m1, t, causal))
        out = torch.cat(parts, dim=2)
        if not causal and g:
            top = F.scaled_dot_product_attention(q[:, :, :g], k, v)
            out = torch.cat([top, out[:, :, g:]], dim=2)
        return out

    def _edge(self, q: Tensor, k: Tensor, v: Tensor, start: int, stop: int, causal: bool) -> Tensor:
        """Queries start..stop-1 with one dense-masked call over the keys they can reach."""
        t, dev = k.shape[-2], q.device
        lo, hi = self._reach(causal)
        g = self.global_tokens
        first, last = max(0, start - lo), min(t, stop + hi)
        k_pos = torch.arange(first, last, device=dev)
        if g and first > 0:
            k_pos = torch.cat([torch.arange(min(g, first), device=dev), k_pos])
        q_pos = torch.arange(start, stop, device=dev)
        mask = self._visible(q_pos, k_pos, causal, globals_=True)
        return F.scaled_dot_product_attention(
            q[:, :, start:stop], k.index_select(2, k_pos), v.index_select(2, k_pos), attn_mask=mask
        )
