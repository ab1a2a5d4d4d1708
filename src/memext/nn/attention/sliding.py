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

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from memext.nn.attention import AttentionKernel, check_inputs, register_attention
from memext.registry import SettingError, check_int


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@register_attention("sliding")
class SlidingWindowAttention(AttentionKernel):
    def __init__(
        self, window: int = 256, dilation: int = 1, global_tokens: int = 0, block: int = 0
    ) -> None:
        super().__init__()
        self.check(window, dilation, global_tokens, block)
        self.window = window
        self.dilation = dilation
        self.global_tokens = global_tokens
        # Measured on CPU: a quarter of the window keeps per-block overhead low while wasting
        # little compute on the masked corners of each span.
        self.block = block or min(256, max(16, 1 << max(0, (window // 4).bit_length() - 1)))
        #: On CPU, run the pieces through the fused flash kernel with the memory-lean backward;
        #: False forces the portable path (plain SDPA + autograd) that other devices take.
        self.fused_cpu = True
        self._plans: dict[tuple[int, bool, torch.device], list[_Piece]] = {}

    @classmethod
    def check(cls, window: int, dilation: int, global_tokens: int, block: int) -> None:
        check_int(cls.name, "window", window, 1)
        check_int(cls.name, "dilation", dilation, 1)
        check_int(cls.name, "global_tokens", global_tokens, 0)
        check_int(cls.name, "block", block, 0)
        if dilation > 1 and global_tokens:
            raise SettingError(
                cls.name,
                "dilation",
                dilation,
                "1 with global_tokens > 0 (global keys do not belong to one residue class); "
                "use one or the other",
            )

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
        check_inputs("sliding", q, k, v)
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
        key = (q.shape[-2], causal, q.device)
        pieces = self._plans.pop(key, None)  # every layer and step sees the same few lengths
        if pieces is None:
            pieces = [p for p in self._plan(*key) if p.q1 > p.q0]
        self._plans[key] = pieces  # most recent last
        if len(self._plans) > _PLANS_KEPT:
            self._plans.pop(next(iter(self._plans)))
        if self.fused_cpu and q.device.type == "cpu" and hasattr(torch.ops.aten, _CPU_FLASH):
            return _BandedCPU.apply(q, k, v, pieces)
        return torch.cat([_run_piece(p, q, k, v) for p in pieces], dim=2)

    def _plan(self, t: int, causal: bool, dev: torch.device) -> list[_Piece]:
        """Cut the queries 0..t-1 into pieces, each one SDPA call's worth of work."""
        g, blk = self.global_tokens, self.block
        lo, hi = self._reach(causal)
        span_lo, span_hi = _round_up(lo, blk), _round_up(hi, blk)
        # Middle blocks start where no span is cut by the start nor touches the global keys.
        m0 = max(span_lo, g + lo if g else 0)
        n_mid = max(0, (t - span_hi - m0) // blk)
        if n_mid < 2:  # short sequence: one dense-masked call is cheapest
            return [self._dense(0, t, t, causal, dev)]
        m1 = m0 + n_mid * blk
        # Bidirectional global queries see every key: a piece of their own, ahead of the rest.
        first = g if g and not causal else 0
        pieces = [self._dense(0, g, t, causal, dev, every_key=True)] if first else []
        pieces.append(self._dense(first, m0, t, causal, dev))
        span = span_lo + blk + span_hi
        rows, cols = torch.arange(blk, device=dev), torch.arange(span, device=dev)
        band = self._visible(rows + span_lo, cols, causal, globals_=False)
        if g:  # every middle query sees the global keys; none of them is inside its band
            band = torch.cat([band.new_ones(blk, g), band], 1)
        group = max(1, _GROUP_TOKENS // blk) * blk  # bounds backward's per-call scratch memory
        for q0 in range(m0, m1, group):
            q1 = min(m1, q0 + group)
            pieces.append(_Piece(q0, q1, band, k0=q0 - span_lo, span=span, blk=blk, glob=g))
        if m1 < t:
            pieces.append(self._dense(m1, t, t, causal, dev))
        return pieces

    def _dense(
        self, start: int, stop: int, t: int, causal: bool, dev: torch.device, every_key=False
    ) -> _Piece:
        """Queries start..stop-1 against every key they can reach, with a dense mask."""
        q_pos = torch.arange(start, stop, device=dev)
        if every_key:
            keys = torch.arange(t, device=dev)
            return _Piece(start, stop, q_pos.new_ones(stop - start, t, dtype=torch.bool), keys)
        lo, hi = self._reach(causal)
        g = self.global_tokens
        first, last = max(0, start - lo), min(t, stop + hi)
        keys = torch.arange(first, last, device=dev)
        if causal and start == 0 and stop - 1 <= lo:  # every query sees all keys up to itself
            return _Piece(start, stop, None, keys, is_causal=True)
        if g and first > 0:
            keys = torch.cat([torch.arange(min(g, first), device=dev), keys])
        return _Piece(start, stop, self._visible(q_pos, keys, causal, globals_=True), keys)


# Queries per middle piece: large enough to keep the cores busy, small enough that the backward's
# per-window key/value gradients (span/block times the piece's keys) stay a few MiB.
_GROUP_TOKENS = 1024
_PLANS_KEPT = 8  # cached plans (lengths) per kernel: training, eval and a few generation shapes
_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


@dataclass(frozen=True)
class _Piece:
    """Queries q0..q1-1 and the keys they see: dense (``keys``) or windowed (``span`` > 0).

    Windowed: the queries form blocks of ``blk``; block i sees the ``span`` keys starting at
    ``k0 + i * blk`` (plus the first ``glob`` keys), all under the same ``mask``.
    """

    q0: int
    q1: int
    mask: Tensor | None  # None: ``is_causal`` (a square piece where each query sees keys <= it)
    keys: Tensor | None = None
    k0: int = 0
    span: int = 0
    blk: int = 0
    glob: int = 0
    is_causal: bool = False

    def queries(self, x: Tensor) -> Tensor:
        """(..., T, D) -> the piece's queries as (..., blocks, rows, D)."""
        rows = x[..., self.q0 : self.q1, :]
        if not self.span:
            return rows.unsqueeze(-3)
        return rows.unflatten(-2, ((self.q1 - self.q0) // self.blk, self.blk))

    def keys_of(self, x: Tensor) -> Tensor:
        """(..., T, D) -> the keys each block sees, (..., blocks, keys, D); a view when possible."""
        if not self.span:
            return x.index_select(-2, self.keys).unsqueeze(-3)
        n = (self.q1 - self.q0) // self.blk
        stop = self.k0 + (n - 1) * self.blk + self.span
        windows = x[..., self.k0 : stop, :].unfold(-2, self.span, self.blk).transpose(-1, -2)
        if not self.glob:
            return windows
        front = x[..., : self.glob, :].unsqueeze(-3)
        return torch.cat([front.expand(*windows.shape[:-2], self.glob, x.shape[-1]), windows], -2)

    def add_key_grad(self, grad: Tensor, g: Tensor) -> None:
        """Fold the per-block key gradients ``g`` (B, blocks, keys, D) into ``grad`` (B, T, D)."""
        if not self.span:
            grad.index_add_(-2, self.keys, g.squeeze(-3))
            return
        n = g.shape[-3]
        if self.glob:
            grad[..., : self.glob, :] += g[..., : self.glob, :].sum(-3)
            g = g[..., self.glob :, :]
        for o in range(0, self.span, self.blk):  # window offset o lands on k0 + o + i * blk
            start = self.k0 + o
            grad[..., start : start + n * self.blk, :].unflatten(-2, (n, self.blk)).add_(
                g[..., o : o + self.blk, :]
            )


def _run_piece(p: _Piece, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Autograd-friendly path (any device): one SDPA call, blocks folded into the batch."""
    b, h, _, d = q.shape
    qs, ks, vs = p.queries(q), p.keys_of(k), p.keys_of(v)  # (B, H, n, rows | keys, D)
    out = F.scaled_dot_product_attention(
        qs.flatten(0, 1),
        ks.flatten(0, 1),
        vs.flatten(0, 1),
        attn_mask=p.mask,
        is_causal=p.is_causal,
    )
    return out.view(b, h, p.q1 - p.q0, d)


@functools.lru_cache(maxsize=64)  # keyed by the mask object: plans are cached, so masks persist
def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


class _BandedCPU(torch.autograd.Function):
    """The pieces through PyTorch's fused CPU attention, one head at a time, with a backward that
    folds each piece's key/value gradients straight back into (B, H, T, D) buffers.

    Autograd through the strided windows would materialise every window's gradient at once
    (span/block times the size of K and V); here only one piece of one head is in flight, so
    training memory stays that of full SDPA: q, k, v, the output, its log-sum-exp and their
    gradients. Looping over heads keeps every tensor a strided view, never a copy.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pieces: list[_Piece]) -> Tensor:
        flash = getattr(torch.ops.aten, _CPU_FLASH)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        masks = [None if p.mask is None else _additive(p.mask, q.dtype) for p in pieces]
        lses, training = [], any(ctx.needs_input_grad[:3])
        for h in range(q.shape[1]):
            qh, kh, vh = q[:, h], k[:, h], v[:, h]
            for p, m in zip(pieces, masks, strict=True):
                qs, ks, vs = p.queries(qh), p.keys_of(kh), p.keys_of(vh)
                o, lse = flash(qs, ks, vs, 0.0, p.is_causal, attn_mask=m)
                out[:, h, p.q0 : p.q1] = o.flatten(1, 2)
                del o  # the piece's output is copied; free it before the next call allocates
                if training:
                    lses.append(lse)
        if training:
            ctx.pieces, ctx.masks = pieces, masks
            ctx.save_for_backward(q, k, v, out, *lses)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, *lses = ctx.saved_tensors
        flash_bwd = getattr(torch.ops.aten, _CPU_FLASH + "_backward")
        gq, gk, gv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grad_out = grad_out.contiguous()
        it = iter(lses)
        for h in range(q.shape[1]):
            qh, kh, vh, oh, goh = q[:, h], k[:, h], v[:, h], out[:, h], grad_out[:, h]
            for p, m in zip(ctx.pieces, ctx.masks, strict=True):
                dq, dk, dv = flash_bwd(
                    p.queries(goh),
                    p.queries(qh),
                    p.keys_of(kh),
                    p.keys_of(vh),
                    p.queries(oh),
                    next(it),
                    0.0,
                    p.is_causal,
                    attn_mask=m,
                )
                gq[:, h, p.q0 : p.q1] = dq.flatten(1, 2)
                p.add_key_grad(gk[:, h], dk)
                p.add_key_grad(gv[:, h], dv)
        return gq, gk, gv, None
