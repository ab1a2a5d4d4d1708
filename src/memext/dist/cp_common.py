"""What ring and Ulysses attention share: how a sequence is laid out across the ranks of a
context-parallel group, the global positions of each rank's rows (for rotary), the checks of the
shards both are given, which kernels the ring can stand in for, and the ring's tile plan (which
query and key blocks of two shards see each other, a pure function of positions).

Layouts (the sequence of ``T`` tokens, ``N`` ranks):

- ``zigzag`` (default): the sequence is cut into ``2N`` equal chunks and rank ``r`` holds chunks
  ``r`` and ``2N-1-r``, in that order. Under a causal mask an early chunk has little to attend to
  and a late one much, so pairing them gives every rank the same work (ring attention needs
  this; Ulysses does not care, but takes the same layout so a model shards its batch once).
- ``contiguous``: rank ``r`` holds tokens ``r*T/N .. (r+1)*T/N - 1``.

A layout is a list of *runs* per rank, ``(global start, length)`` in local row order; everything
else (sharding, unsharding, positions, the ring's tile plan) is written against runs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("zigzag", "contiguous")

Runs = tuple[tuple[int, int], ...]


def shard_runs(total: int, rank: int, world: int, layout: str = "zigzag") -> Runs:
    """The ``(global start, length)`` runs rank ``rank`` holds of a ``total``-token sequence."""
    if layout not in LAYOUTS:
        raise ValueError(f"context parallel: unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not 0 <= rank < world:
        raise ValueError(f"context parallel: rank {rank} is outside a group of {world}")
    parts = 2 * world if layout == "zigzag" else world
    if total <= 0 or total % parts:
        raise ValueError(
            f"context parallel ({layout}): a sequence of {total} tokens does not split into "
            f"{parts} equal chunks over {world} ranks; pad it to a multiple of {parts}"
        )
    c = total // parts
    if layout == "contiguous":
        return ((rank * c, c),)
    return ((rank * c, c), ((2 * world - 1 - rank) * c, c))


def shard_sequence(
    x: Tensor, rank: int, world: int, *, layout: str = "zigzag", dim: int = -2
) -> Tensor:
    """Rank ``rank``'s rows of the whole sequence ``x`` along ``dim`` (a copy)."""
    runs = shard_runs(x.shape[dim], rank, world, layout)
    return torch.cat([x.narrow(dim, s, n) for s, n in runs], dim=dim)


def unshard_sequence(shards: Sequence[Tensor], *, layout: str = "zigzag", dim: int = -2) -> Tensor:
    """The whole sequence from every rank's shard, ``shards[r]`` being rank r's."""
    world = len(shards)
    total = sum(s.shape[dim] for s in shards)
    pieces: list[tuple[int, Tensor]] = []
    for r, shard in enumerate(shards):
        off = 0
        for start, n in shard_runs(total, r, world, layout):
            pieces.append((start, shard.narrow(dim, off, n)))
            off += n
    return torch.cat([p for _, p in sorted(pieces, key=lambda sp: sp[0])], dim=dim)


def gather_sequence(
    x: Tensor, group: dist.ProcessGroup | None = None, *, layout: str = "zigzag", dim: int = -2
) -> Tensor:
    """Every rank's shard gathered into the whole sequence, on every rank (no autograd; for
    evaluation and tests)."""
    world = dist.get_world_size(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    return unshard_sequence(shards, layout=layout, dim=dim)


def shard_positions(
    total: int,
    rank: int,
    world: int,
    *,
    layout: str = "zigzag",
    device: torch.device | str | None = None,
) -> Tensor:
    """Global positions (int64, ``(T/N,)``) of rank ``rank``'s rows. Rotary must use these, with
    ``seq_len=total`` for rules that depend on the length read (``Rotary(positions, seq_len=)``),
    so that every rank rotates exactly as one process reading the whole sequence would."""
    runs = shard_runs(total, rank, world, layout)
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in runs])


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` (None: the default group) and the group's size."""
    return dist.get_rank(group), dist.get_world_size(group)


def checked_world(
    name: str, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None, layout: str
) -> int:
    """The size of ``group`` (None: the default group), once q ``(B, H, T/N, D)`` and k, v
    ``(B, Hkv, T/N, D)`` are shards that ``name`` (``ring attention``, ``ulysses attention``)
    can attend: one batch, length and head size, a KV head count that divides ``H``, and a
    known ``layout``; otherwise a ``ValueError`` that names ``name``."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"{name}: expected q (B, H, T, D) and k, v (B, Hkv, T, D), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(
            f"{name}: k, v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, "
            f"length and head size, with a KV head count that divides {h}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: unknown layout {layout!r}; expected one of {LAYOUTS}")
    return group_rank_size(group)[1]


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The default-group rank of ``group``'s member ``group_rank``: point-to-point ops name their
    peer by global rank, and a context-parallel group inside a 2-D mesh is a subgroup."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def ring_window(kernel: torch.nn.Module) -> int | None:
    """The ``window`` argument of ``ring_attention`` that reproduces a registered kernel:
    ``full`` -> None, ``sliding`` (without dilation or global tokens) -> its window. Other
    kernels have no ring form yet; Ulysses runs any kernel as is."""
    name = getattr(kernel, "name", type(kernel).__name__)
    if name == "full":
        return None
    if name == "sliding" and kernel.dilation == 1 and kernel.global_tokens == 0:
        return int(kernel.window)
    raise ValueError(
        f"ring attention reproduces the 'full' kernel and 'sliding' without dilation or global "
        f"tokens, not {kernel!r}; use ulysses_attention, which runs any registered kernel"
    )


# --- the ring's tiles: which (query, key) blocks of two shards see each other -----------------


@dataclass(frozen=True)
class Tile:
    """Local query rows q0..q1-1 against local key rows k0..k1-1 of the visiting block."""

    q0: int
    q1: int
    k0: int
    k1: int
    #: None: every key visible; else (kind, n, rows, cols): a window of the (n, n) mask ``tri_mask``
    mask: tuple[str, int, slice, slice] | None = None
    is_causal: bool = False  # square tile on the diagonal: each row sees keys up to itself

    def visible(self) -> Tensor:
        """(rows, keys) bool, True where a query sees a key (the math twin and the tests)."""
        if self.mask is None:
            full = torch.ones(self.q1 - self.q0, self.k1 - self.k0, dtype=torch.bool)
            return full.tril() if self.is_causal else full
        kind, n, rows, cols = self.mask
        return tri_mask(n, kind)[rows, cols]


def reach(causal: bool, window: int | None, total: int) -> tuple[int, int]:
    """(back, forward): key j is visible to query i when i - back <= j <= i + forward."""
    if causal:
        return (total if window is None else window - 1), 0
    return (total, total) if window is None else (window // 2, window // 2)


@functools.lru_cache(maxsize=64)
def tile_plan(q_runs: Runs, k_runs: Runs, back: int, fwd: int, block: int) -> tuple[Tile, ...]:
    """The tiles that cover every visible (query, key) pair between two shards, none of them
    with a query that sees no key of its tile (the fused kernel would give such a row a
    log-sum-exp of 0, not -inf). Cached: every layer and step repeats the same few plans."""
    tiles: list[Tile] = []
    q_off = 0
    for qs, qn in q_runs:
        k_off = 0
        for ks, kn in k_runs:
            tiles += _pair(qs, qn, q_off, ks, kn, k_off, back, fwd, block)
            k_off += kn
        q_off += qn
    return tuple(tiles)


def _pair(
    qs: int, qn: int, q_off: int, ks: int, kn: int, k_off: int, back: int, fwd: int, block: int
) -> list[Tile]:
    """Tiles for query positions qs.. (qn of them, local row q_off..) against keys ks.. (local
    row k_off..).

    Rows go in blocks of B (the fused kernels' scratch grows with a call's rows). Block rows
    a..a+B-1 see keys a-back .. a+B-1+fwd, which split into three tiles: the first B keys under
    an upper-triangular mask (the band's lower edge), the keys every row sees (no mask), and
    the last B keys under a lower-triangular one (the upper edge; causal: the ``is_causal``
    square). With B <= back + fwd they do not overlap, and the two masks are the same (B, B)
    pair for every block, so the masks cost O(B²) memory however long the sequence or wide
    the window.
    """
    if back + fwd == 0:  # window 1: each query sees itself only
        b0, b1 = max(qs, ks), min(qs + qn, ks + kn)
        if b0 >= b1:
            return []
        eye = ("eye", b1 - b0, slice(None), slice(None))
        return [Tile(b0 - qs + q_off, b1 - qs + q_off, b0 - ks + k_off, b1 - ks + k_off, eye)]
    rows = min(block, back + fwd)
    r0, r1 = max(qs, ks - fwd), min(qs + qn, ks + kn + back)  # rows that see some key here
    ke = ks + kn
    tiles = []

    def add(a: int, b: int, k0: int, k1: int, mask: tuple | None, causal: bool = False) -> None:
        q0, q1 = a - qs + q_off, b - qs + q_off
        tiles.append(Tile(q0, q1, k0 - ks + k_off, k1 - ks + k_off, mask, causal))

    for a in range(r0, r1, rows):
        b = min(r1, a + rows)
        n = b - a
        # Lower edge: keys a-back .. b-back-1; row r sees key c when c >= r.
        k0, k1 = max(ks, a - back), min(ke, b - back)
        if k0 < k1:
            c0, c1 = k0 - (a - back), k1 - (a - back)
            m = min(n, c1)  # rows past the last key see none of them: left out
            add(a, a + m, k0, k1, ("upper", n, slice(0, m), slice(c0, c1)))
        # Middle: keys b-back .. a+fwd-1, seen by every row.
        k0, k1 = max(ks, b - back), min(ke, a + fwd)
        if k0 < k1:
            add(a, b, k0, k1, None)
        # Upper edge: keys a+fwd .. b+fwd-1; row r sees key c when c <= r.
        k0, k1 = max(ks, a + fwd), min(ke, b + fwd)
        if k0 < k1:
            c0, c1 = k0 - (a + fwd), k1 - (a + fwd)
            if fwd == 0 and (c0, c1) == (0, n):
                add(a, b, k0, k1, None, causal=True)
            else:  # rows before the first key see none of them: left out
                add(a + c0, b, k0, k1, ("lower", n, slice(c0, n), slice(c0, c1)))
    return tiles


@functools.lru_cache(maxsize=16)
def tri_mask(n: int, kind: str) -> Tensor:
    """(n, n) bool: ``upper`` (key c seen by row r when c >= r), ``lower`` (c <= r) or ``eye``."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return {"upper": j >= i, "lower": j <= i, "eye": j == i}[kind]
