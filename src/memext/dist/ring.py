"""Ring attention: exact attention over a sequence split across the ranks of a process group.

Each rank holds its shard of q, k and v (``cp_common`` layouts; zig-zag by default, which gives
every rank the same causal work). K and V pass around the ring, one hop per step, while the rank
attends its queries to the block it holds; the partial outputs are merged by their log-sum-exp
(online softmax). After ``N`` steps every query has seen every key, and the output is that of
one process attending the whole sequence.

Which (query, key) pairs are computed is decided by global position, so the same code serves
``causal`` or bidirectional, whole-sequence (``full``) or banded (``sliding``, ``window``)
attention: each (query run, key run) pair becomes a few *tiles*, and a tile no query of which can
see a key of is never computed (a window skips every block outside it; causal skips the future).
A tile is one call to PyTorch's fused CPU attention, which returns its log-sum-exp; off the CPU a
plain math twin runs instead (exact, but it materialises the tile's scores).

Backward (``_Ring``) passes K and V around the ring again. With the merged output ``O`` and
log-sum-exp ``L`` saved, each tile's gradients follow from the fused backward given the *global*
``O`` and ``L`` (P = exp(S - L) is the tile's exact share of the softmax), so gradients are exact.
dQ stays home; dK and dV for a visiting block travel with it and arrive home after the last hop.

Memory. Heads go through the ring a few at a time (``heads_per_pass`` KV heads), so the ring's
own buffers (two K/V blocks in flight, a travelling dK/dV and its successor) are a small fraction
of the shard: per rank, training memory is the shard's q, k, v, output and gradients plus
O(heads_per_pass / heads) of that.

Communication is ``dist.batch_isend_irecv`` (gloo on CPU, nccl on CUDA); the K/V hop overlaps the
step's compute, and the dK/dV hop overlaps the next step's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from memext.dist.cp_common import (
    Tile,
    checked_world,
    global_rank,
    group_rank_size,
    reach,
    shard_runs,
    tile_plan,
    tri_mask,
)

_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    causal: bool = True,
    window: int | None = None,
    layout: str = "zigzag",
    heads_per_pass: int = 1,
    block: int = 0,
    scale: float | None = None,
    fused: bool | None = None,
) -> Tensor:
    """softmax(q kᵀ·scale + mask) v over the whole sequence, given this rank's shard of it.

    q ``(B, H, T/N, D)``, k and v ``(B, Hkv, T/N, D)`` with ``H % Hkv == 0`` (grouped-query
    attention: q head h reads KV head ``h // (H/Hkv)``), laid out by ``layout`` across the ``N``
    ranks of ``group`` (None: the default group). Mask: key j is visible to query i when
    ``causal`` and ``i-window < j <= i`` (``window`` None: ``j <= i``), or bidirectional and
    ``|i-j| <= window//2`` (None: every key); this is ``full`` and ``sliding`` attention
    (``memext.nn.reference.sliding_mask``). ``heads_per_pass``: KV heads per trip round the ring
    (memory against message count); ``block``: query rows per tile (0: from the window);
    ``fused``: tiles through PyTorch's fused CPU attention (None: when on CPU; False: the math
    twin that other devices run). Returns this rank's rows of the output, ``(B, H, T/N, D)``,
    differentiable.
    """
    world = checked_world("ring attention", q, k, v, group, layout)
    t, d = q.shape[2:]
    shard_runs(t * world, 0, world, layout)  # refuses a shard that is not whole chunks
    if window is not None and window < 1:
        raise ValueError(f"ring attention: window must be >= 1 or None, got {window}")
    if heads_per_pass < 1:
        raise ValueError(f"ring attention: heads_per_pass must be >= 1, got {heads_per_pass}")
    opts = _Options(
        group=group,
        causal=causal,
        window=window,
        layout=layout,
        heads_per_pass=heads_per_pass,
        block=block or _default_block(window),
        scale=scale if scale is not None else 1.0 / math.sqrt(d),
        fused=_fusable(q) if fused is None else fused and _fusable(q),
    )
    return _Ring.apply(q, k, v, opts)


def _fusable(q: Tensor) -> bool:
    return q.device.type == "cpu" and hasattr(torch.ops.aten, _CPU_FLASH)


def _default_block(window: int | None) -> int:
    """Query rows per tile: 512 (the fused backward's scratch grows with them), or half a
    narrower window, so that a block's masked edges are a small share of its keys."""
    return 512 if window is None else max(1, min(512, window // 2))


@dataclass(frozen=True)
class _Options:
    group: dist.ProcessGroup | None
    causal: bool
    window: int | None
    layout: str
    heads_per_pass: int
    block: int
    scale: float
    fused: bool  # PyTorch's fused CPU attention per tile; False: the math twin


# --- one tile: forward (out, log-sum-exp) and backward given the global out and lse ----------


@functools.lru_cache(maxsize=16)
def _additive(n: int, kind: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``tri_mask(n, kind)`` as the additive mask the fused kernel takes (0 or -inf)."""
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill(
        ~tri_mask(n, kind).to(device), -math.inf
    )


def _fused_mask(tile: Tile, q: Tensor) -> Tensor | None:
    if tile.mask is None:
        return None
    kind, n, rows, cols = tile.mask
    return _additive(n, kind, q.dtype, q.device)[rows, cols]


def _tile_forward(
    tile: Tile, q: Tensor, k: Tensor, v: Tensor, o: _Options
) -> tuple[Tensor, Tensor]:
    if o.fused:
        m = _fused_mask(tile, q)
        out, lse = getattr(torch.ops.aten, _CPU_FLASH)(
            q, k, v, 0.0, tile.is_causal, attn_mask=m, scale=o.scale
        )
        return out, lse
    p, lse = _probabilities(tile, q, k, o.scale, None)
    return (p.to(v.dtype) @ v), lse


def _tile_backward(
    tile: Tile, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, o: _Options
) -> tuple[Tensor, Tensor, Tensor]:
    if o.fused:
        m = _fused_mask(tile, q)
        return getattr(torch.ops.aten, _CPU_FLASH + "_backward")(
            do, q, k, v, out, lse, 0.0, tile.is_causal, attn_mask=m, scale=o.scale
        )
    p, _ = _probabilities(tile, q, k, o.scale, lse)
    dv = p.to(do.dtype).transpose(-1, -2) @ do
    dp = (do @ v.transpose(-1, -2)).float()
    ds = p * (dp - (do.float() * out.float()).sum(-1, keepdim=True))
    ds = ds.to(q.dtype)
    return (ds @ k) * o.scale, (ds.transpose(-1, -2) @ q) * o.scale, dv


def _probabilities(
    tile: Tile, q: Tensor, k: Tensor, scale: float, lse: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The math twin's exp(S - L) in fp32, with L the tile's own log-sum-exp when ``lse`` is None."""
    s = (q @ k.transpose(-1, -2)).float() * scale
    if tile.mask is not None or tile.is_causal:
        s = s.masked_fill(~tile.visible().to(s.device), -math.inf)
    if lse is None:
        lse = s.logsumexp(-1)
    return torch.exp(s - lse[..., None]), lse


# --- the ring ---------------------------------------------------------------------------------


class _Exchange:
    """Send ``send`` to the next rank and receive the same shape from the previous one."""

    def __init__(self, send: Tensor, o: _Options, tag: int) -> None:
        rank, world = group_rank_size(o.group)
        self.recv = torch.empty_like(send)
        nxt, prv = (
            global_rank(o.group, (rank + 1) % world),
            global_rank(o.group, (rank - 1) % world),
        )
        self.works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, send, nxt, o.group, tag),
                dist.P2POp(dist.irecv, self.recv, prv, o.group, tag),
            ]
        )

    def wait(self) -> Tensor:
        for w in self.works:
            w.wait()
        return self.recv


def _kv_heads(x: Tensor, rep: int) -> Tensor:
    """KV heads repeated for the query heads that read them (grouped-query attention)."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _plans(t: int, o: _Options) -> list[tuple[Tile, ...]]:
    """The tile plan against each source rank's block, indexed by ring step."""
    rank, world = group_rank_size(o.group)
    back, fwd = reach(o.causal, o.window, t * world)
    mine = shard_runs(t * world, rank, world, o.layout)
    srcs = [(rank - s) % world for s in range(world)]
    return [
        tile_plan(mine, shard_runs(t * world, s, world, o.layout), back, fwd, o.block) for s in srcs
    ]


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, o: _Options) -> Tensor:
        b, h, t, _ = q.shape
        hkv, world = k.shape[1], group_rank_size(o.group)[1]
        rep, plans = h // hkv, _plans(t, o)
        acc = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
        for g0 in range(0, hkv, o.heads_per_pass):
            g1 = min(hkv, g0 + o.heads_per_pass)
            qh, oh, lh = (x[:, g0 * rep : g1 * rep] for x in (q, acc, lse))
            oh.zero_()
            lh.fill_(-math.inf)
            kv = torch.stack((k[:, g0:g1], v[:, g0:g1]))  # the ring's message: one contiguous block
            for step in range(world):
                hop = _Exchange(kv, o, tag=0) if step < world - 1 else None
                for tile in plans[step]:
                    out, l_t = _tile_forward(
                        tile,
                        qh[:, :, tile.q0 : tile.q1],
                        _kv_heads(kv[0, :, :, tile.k0 : tile.k1], rep),
                        _kv_heads(kv[1, :, :, tile.k0 : tile.k1], rep),
                        o,
                    )
                    _merge(oh[:, :, tile.q0 : tile.q1], lh[:, :, tile.q0 : tile.q1], out, l_t)
                    del out, l_t
                kv = hop.wait() if hop is not None else None
        out = acc.to(q.dtype)
        ctx.o = o
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        o: _Options = ctx.o
        h, t = q.shape[1:3]
        hkv, world = k.shape[1], group_rank_size(o.group)[1]
        rep, plans = h // hkv, _plans(t, o)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros_like(dk)
        for g0 in range(0, hkv, o.heads_per_pass):
            g1 = min(hkv, g0 + o.heads_per_pass)
            qs = slice(g0 * rep, g1 * rep)
            qh, goh, outh, lh, dqh = q[:, qs], grad_out[:, qs], out[:, qs], lse[:, qs], dq[:, qs]
            kv = torch.stack((k[:, g0:g1], v[:, g0:g1]))
            own = (dk[:, g0:g1], dv[:, g0:g1])
            travelling: _Exchange | None = None  # the dK/dV of the block arriving next
            for step in range(world):
                hop = _Exchange(kv, o, tag=0) if step < world - 1 else None
                # Step 0's block is this rank's own: its gradients go straight to dK, dV; a
                # visiting block's go into a fresh buffer that joins the travelling sum.
                part = own if step == 0 else kv.new_zeros(kv.shape, dtype=torch.float32)
                for tile in plans[step]:
                    rows, keys = slice(tile.q0, tile.q1), slice(tile.k0, tile.k1)
                    gq, gk, gv = _tile_backward(
                        tile,
                        goh[:, :, rows],
                        qh[:, :, rows],
                        _kv_heads(kv[0, :, :, keys], rep),
                        _kv_heads(kv[1, :, :, keys], rep),
                        outh[:, :, rows],
                        lh[:, :, rows],
                        o,
                    )
                    dqh[:, :, rows] += gq
                    part[0][:, :, keys] += _fold(gk, rep)
                    part[1][:, :, keys] += _fold(gv, rep)
                    del gq, gk, gv
                if hop is not None:
                    kv = hop.wait()
                else:
                    del kv  # the last block: free it before the dK/dV hand-off allocates
                if step > 0:
                    if travelling is not None:  # the sum of the ranks this block visited before
                        part += travelling.wait()
                    travelling = _Exchange(part, o, tag=1)  # on to the next rank (last: home)
                del part
            if travelling is not None:  # this rank's own block, back with every rank's share
                home = travelling.wait()
                own[0].add_(home[0])
                own[1].add_(home[1])
                del home, travelling
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _fold(g: Tensor, rep: int) -> Tensor:
    """Key/value gradients of repeated KV heads summed back onto the heads they repeat."""
    return g if rep == 1 else g.unflatten(1, (-1, rep)).sum(2)


def _merge(acc: Tensor, lse: Tensor, out: Tensor, l_t: Tensor) -> None:
    """Fold a tile's (out, lse) into the running (acc, lse) rows in place: online softmax."""
    new = torch.logaddexp(lse, l_t)
    acc.mul_(torch.exp(lse - new).unsqueeze(-1))
    acc.add_(out.float().mul_(torch.exp(l_t - new).unsqueeze(-1)))
    lse.copy_(new)
