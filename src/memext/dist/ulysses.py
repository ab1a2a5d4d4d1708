"""Ulysses attention (DeepSpeed-Ulysses): trade the sequence split for a head split.

Each rank holds its shard of the sequence for every head. An all-to-all gives each rank the whole
sequence for ``H/N`` of the heads; it runs the registered attention kernel on them as one process
would (any kernel, any mask: nothing about the attention changes), and a second all-to-all sends
each rank back its own rows for every head. Both exchanges are ``dist.all_to_all_single``, which
gloo supports on CPU in torch 2.13, as nccl does on CUDA.

Memory. Heads go through a few at a time (``heads_per_pass`` KV heads per rank per pass), and the
backward pass re-fetches q, k and v and recomputes each pass's attention before differentiating
it, rather than keeping every head's whole-sequence activations from the forward: per rank,
training memory is the shard's q, k, v, output and gradients plus one pass's worth of
whole-sequence tensors. The price is one extra attention forward per backward.

Heads must divide among the ranks. With grouped-query attention the KV heads must divide too;
when they do not, ``ulysses_attention`` repeats them up to the query heads first (plain autograd:
their gradients are summed back), which costs that repetition's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from memext.dist.cp_common import checked_world, group_rank_size, shard_runs


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    kernel: nn.Module | None = None,
    causal: bool = True,
    layout: str = "zigzag",
    heads_per_pass: int = 1,
) -> Tensor:
    """``kernel(q, k, v, causal=causal)`` over the whole sequence, given this rank's shard.

    q ``(B, H, T/N, D)``, k and v ``(B, Hkv, T/N, D)``, laid out by ``layout`` over the ``N``
    ranks of ``group`` (None: the default group). ``kernel``: a registered attention kernel
    (``memext.nn.attention.build_attention``; None: ``full``). ``heads_per_pass``: KV heads each
    rank attends per pass (memory against message count). ``H`` must be divisible by ``N``.
    Returns this rank's rows of the output, ``(B, H, T/N, D)``, differentiable.
    """
    if kernel is None:
        from memext.nn.attention import build_attention

        kernel = build_attention("full")
    world = checked_world("ulysses attention", q, k, v, group, layout)
    h, t = q.shape[1:3]
    if h % world:
        raise ValueError(
            f"ulysses attention: {h} query heads do not divide among {world} ranks; use a head "
            f"count divisible by {world}, or ring_attention"
        )
    shard_runs(t * world, 0, world, layout)  # refuses a shard that is not whole chunks
    if heads_per_pass < 1:
        raise ValueError(f"ulysses attention: heads_per_pass must be >= 1, got {heads_per_pass}")
    if k.shape[1] % world:  # too few KV heads to split: give every query head its own
        k, v = (x.repeat_interleave(h // k.shape[1], dim=1) for x in (k, v))
    return _Ulysses.apply(q, k, v, _Options(group, kernel, causal, layout, heads_per_pass))


@dataclass(frozen=True)
class _Options:
    group: dist.ProcessGroup | None
    kernel: nn.Module
    causal: bool
    layout: str
    heads_per_pass: int


def _to_heads(x: Tensor, heads: slice, o: _Options) -> Tensor:
    """This rank's shard of ``x`` (B, Hx, T/N, D), heads ``heads`` -> the whole sequence of its
    share of those heads, (B, len/N, T, D), in sequence order."""
    world = group_rank_size(o.group)[1]
    b, _, t, d = x.shape
    send = x[:, heads].unflatten(1, (world, -1)).movedim(1, 0).contiguous()  # (N, B, hx, T/N, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=o.group)  # recv[j]: rank j's rows of my heads
    del send
    whole = x.new_empty(b, recv.shape[2], t * world, d)
    for j in range(world):
        off = 0
        for start, n in shard_runs(t * world, j, world, o.layout):
            whole[:, :, start : start + n] = recv[j, :, :, off : off + n]
            off += n
    return whole


def _to_rows(y: Tensor, out: Tensor, heads: slice, o: _Options) -> None:
    """The inverse of ``_to_heads``: the whole sequence of this rank's heads, ``y``
    (B, hx, T, D) -> every rank's rows of them; this rank's rows land in ``out[:, heads]``."""
    world = group_rank_size(o.group)[1]
    t = y.shape[2] // world
    send = y.new_empty(world, y.shape[0], y.shape[1], t, y.shape[3])
    for j in range(world):
        off = 0
        for start, n in shard_runs(y.shape[2], j, world, o.layout):
            send[j, :, :, off : off + n] = y[:, :, start : start + n]
            off += n
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=o.group)  # recv[j]: my rows of rank j's heads
    del send
    out[:, heads] = recv.movedim(0, 1).flatten(1, 2)


class _Ulysses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, o: _Options) -> Tensor:
        world = group_rank_size(o.group)[1]
        rep = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        for kh, qh in _passes(k.shape[1], rep, world, o.heads_per_pass):
            qw, kw, vw = _to_heads(q, qh, o), _to_heads(k, kh, o), _to_heads(v, kh, o)
            with torch.no_grad():
                y = o.kernel(qw, _repeat(kw, rep), _repeat(vw, rep), causal=o.causal)
            del qw, kw, vw
            _to_rows(y, out, qh, o)
            del y
        ctx.o = o
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v = ctx.saved_tensors
        o: _Options = ctx.o
        world = group_rank_size(o.group)[1]
        rep = q.shape[1] // k.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for kh, qh in _passes(k.shape[1], rep, world, o.heads_per_pass):
            qw, kw, vw = (
                _to_heads(x, s, o).requires_grad_() for x, s in ((q, qh), (k, kh), (v, kh))
            )
            gw = _to_heads(grad_out, qh, o)
            with torch.enable_grad():  # recompute this pass's attention, then differentiate it
                y = o.kernel(qw, _repeat(kw, rep), _repeat(vw, rep), causal=o.causal)
                gq, gk, gv = torch.autograd.grad(y, (qw, kw, vw), gw)
            del y, gw, qw, kw, vw
            _to_rows(gq, dq, qh, o)  # one at a time: each is freed before the next is sent
            del gq
            _to_rows(gk, dk, kh, o)
            del gk
            _to_rows(gv, dv, kh, o)
            del gv
        return dq, dk, dv, None


def _passes(hkv: int, rep: int, world: int, per_pass: int) -> list[tuple[slice, slice]]:
    """(KV heads, query heads) of each pass: ``per_pass`` KV heads per rank, ``world`` ranks."""
    step = world * per_pass
    return [
        (slice(a, min(hkv, a + step)), slice(a * rep, min(hkv, a + step) * rep))
        for a in range(0, hkv, step)
    ]


def _repeat(x: Tensor, rep: int) -> Tensor:
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)
