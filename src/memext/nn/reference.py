"""Naive, obviously-correct twins of the fast paths: dense masks and plain softmax.

Used by the tests and by anyone debugging a kernel; never on a hot path. Every mask is a bool
tensor, True = may attend, shaped (Tq, Tk) or broadcastable to (B, H, Tq, Tk). Queries sit at the
last Tq key positions (the kernels' bottom-right alignment).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _positions(tq: int, tk: int, device: torch.device | None) -> tuple[Tensor, Tensor]:
    q_pos = torch.arange(tq, device=device)[:, None] + (tk - tq)
    k_pos = torch.arange(tk, device=device)[None, :]
    return q_pos, k_pos


def causal_mask(tq: int, tk: int, device: torch.device | None = None) -> Tensor:
    """(Tq, Tk): query i sits at key position i + Tk - Tq and sees every key up to itself."""
    q_pos, k_pos = _positions(tq, tk, device)
    return k_pos <= q_pos


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(D) masked) v in the input dtype's math, on (B, H, T, D).

    A query with no visible key gets a row of NaN, exactly as the formula says; kernels must never
    produce one (each variant's rules guarantee at least one visible key).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def block_sparse_mask(
    tq: int,
    tk: int,
    *,
    block_size: int,
    window: int,
    global_tokens: int,
    causal: bool,
    random_blocks: list[list[int]] | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """(Tq, Tk): BigBird's pattern, block by block (see ``memext.nn.attention.block_sparse``).

    Query block i sees key block j when j is in the band (causal: the ceil((W-1)/bs) blocks before
    i and i; bidirectional: ceil(W/2/bs) blocks each side), j is global, i is global
    (bidirectional only), or j is one of ``random_blocks[i]`` (the kernel's draw, passed in;
    entries < 0 are ignored). Causal masking then applies token by token.
    """
    n = math.ceil(tk / block_size)
    n_global = math.ceil(global_tokens / block_size)
    layout = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if causal:
                near = i - math.ceil((window - 1) / block_size) <= j <= i
            else:
                near = abs(i - j) <= math.ceil(window / 2 / block_size)
            layout[i, j] = near or j < n_global or (not causal and i < n_global)
        for j in random_blocks[i] if random_blocks else ():
            if j >= 0:
                layout[i, j] = True
    block_of = torch.arange(tk) // block_size
    mask = layout[block_of[tk - tq :]][:, block_of]
    if causal:
        mask &= causal_mask(tq, tk)
    return mask.to(device)


def lsh_reference(
    q: Tensor,
    v: Tensor,
    buckets: Tensor,
    *,
    chunk: int,
    causal: bool,
    key_padding: Tensor | None = None,
    self_score: float = -5e4,
) -> Tensor:
    """Reformer LSH attention, densely (see ``memext.nn.attention.lsh``), on (B, H, T, D).

    ``buckets`` (rounds, B, H, T) is the kernel's hash (``LSHAttention.hash``). Per round: sort by
    (bucket, position), cut into chunks of ``chunk``; query i sees key j when j's chunk is i's or
    the one before, j <= i if causal, j is real per ``key_padding``; its own key always, scored
    ``self_score``. One plain softmax per round; rounds combined by their log-sum-exp.
    """
    t, d = q.shape[-2], q.shape[-1]
    keys = torch.nn.functional.normalize(q, dim=-1)
    scores = q @ keys.transpose(-2, -1) / math.sqrt(d)  # (B, H, T, T)
    pos = torch.arange(t, device=q.device)
    eye = pos[:, None] == pos[None, :]
    outs, lses = [], []
    for round_buckets in buckets:
        order = torch.argsort(round_buckets * t + pos, dim=-1)  # (B, H, T) positions, sorted
        rank = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order).contiguous())
        block = rank // chunk
        gap = block[..., :, None] - block[..., None, :]  # query's chunk - key's chunk
        mask = (gap == 0) | (gap == 1)
        if causal:
            mask &= causal_mask(t, t, q.device)
        if key_padding is not None:
            mask &= key_padding[:, None, None, :].to(torch.bool)
        s = scores.masked_fill(~mask, float("-inf"))
        s = torch.where(eye, torch.full_like(s, self_score), s)
        lses.append(torch.logsumexp(s, dim=-1))
        outs.append(torch.softmax(s, dim=-1) @ v)
    weights = torch.softmax(torch.stack(lses), dim=0)[..., None]  # (rounds, B, H, T, 1)
    return (weights * torch.stack(outs)).sum(dim=0)


def sliding_mask(
    tq: int,
    tk: int,
    window: int,
    *,
    causal: bool = True,
    dilation: int = 1,
    global_tokens: int = 0,
    device: torch.device | None = None,
) -> Tensor:
    """(Tq, Tk) mask of sliding-window attention (``attention="sliding"``).

    Causal: query i sees keys i-(W-1)d, ..., i-d, i. Bidirectional: keys i + kd for |k| <= W/2.
    Global tokens 0..g-1 are seen by every query (causal: by every query at or after them), and
    in bidirectional mode see every key themselves.
    """
    i, j = _positions(tq, tk, device)
    steps, same_class = (i - j) // dilation, (i - j) % dilation == 0
    if causal:
        seen = same_class & (steps >= 0) & (steps < window)
    else:
        seen = same_class & (steps.abs() <= window // 2)
    g = global_tokens
    if causal:
        seen |= (j < g) & (j <= i)
    else:
        seen |= (j < g) | (i < g)
    return seen


def chunked_mask(
    tq: int, tk: int, window: int, *, causal: bool = True, device: torch.device | None = None
) -> Tensor:
    """(Tq, Tk) mask of chunked local attention (``attention="chunked"``): query i sees key j
    when both lie in the same chunk of ``window`` positions (i // W == j // W), and j <= i if
    causal."""
    i, j = _positions(tq, tk, device)
    seen = i // window == j // window
    return seen & (j <= i) if causal else seen


def segment_memory_mask(
    t: int, segment_len: int, mem_len: int, device: torch.device | None = None
) -> Tensor:
    """(T, T): Transformer-XL read in segments, as one pass. Query i of the segment starting at
    s sees keys s - mem_len .. i: its own segment's past plus the ``mem_len`` keys before it."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    start = (i // segment_len) * segment_len
    return (j <= i) & (j >= start - mem_len)


def seq2seq_reference(
    model: torch.nn.Module,
    src: Tensor,
    tgt: Tensor,
    encoder_attention: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """An ``EncoderDecoder``'s logits (B, T, vocab) for src (B, S) and tgt (B, T), recomputed with
    explicit attention matrices from the model's own weights.

    ``encoder_attention(q, k, v)`` is the encoder kernel's naive twin on (B, H, G + S, D) (e.g.
    ``attention`` with ``sliding_mask(..., causal=False, global_tokens=G)``); None = dense.
    The decoder: ``causal_mask`` self-attention, then unmasked cross-attention to every encoder
    state. Norms, feed-forwards and rotary are the model's own modules: only the attention is
    rewritten.
    """
    from memext.nn.rotary import apply_rotary

    def heads(x: Tensor, n: int) -> Tensor:  # (B, T, n * d) -> n tensors (B, H, T, D)
        b, t, _ = x.shape
        h = model.decoder[0].attn.n_heads
        return x.view(b, t, n, h, -1).permute(2, 0, 3, 1, 4)

    def merge(y: Tensor) -> Tensor:
        return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)

    def self_attn(attn, x: Tensor, positions: Tensor, causal: bool, kernel_twin) -> Tensor:
        q, k, v = heads(attn.qkv(x), 3)
        cos, sin = model.rotary(positions)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if attn.kernel.shared_qk:
            k = q
        if causal:
            y = attention(q, k, v, causal_mask(x.shape[1], x.shape[1], x.device))
        elif kernel_twin is not None:
            y = kernel_twin(q, k, v)
        else:
            y = attention(q, k, v)
        return attn.out(merge(y))

    x = model.embed(src)
    if model.global_slots is not None:
        x = torch.cat([model.global_slots.expand(x.shape[0], -1, -1), x], dim=1)
    pos = torch.arange(x.shape[1], device=src.device)
    for block in model.encoder:
        x = x + self_attn(block.attn, block.attn_norm(x), pos, False, encoder_attention)
        x = x + block.ffn(block.ffn_norm(x))
    memory = model.encoder_norm(x)
    y = model.embed(tgt)
    pos = torch.arange(tgt.shape[1], device=tgt.device)
    for block in model.decoder:
        y = y + self_attn(block.attn, block.attn_norm(y), pos, True, None)
        cross = block.cross
        (q,) = heads(cross.q(block.cross_norm(y)), 1)
        k, v = heads(cross.kv(memory), 2)
        y = y + cross.out(merge(attention(q, k, v)))
        y = y + block.ffn(block.ffn_norm(y))
    return model.head(model.norm(y))
