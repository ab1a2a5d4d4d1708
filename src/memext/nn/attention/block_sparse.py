"""BigBird-style block-sparse attention: a band of key blocks, global blocks and random blocks.

Semantics. Positions are cut into blocks of ``block_size`` tokens (block ``b`` holds positions
``b*block_size .. (b+1)*block_size - 1``; the last block may be partial). Each query block ``i``
attends to whole key blocks:

* the band: bidirectional, the ``ceil(window / 2 / block_size)`` blocks on each side of ``i`` and
  ``i`` itself; causal, the ``ceil((window - 1) / block_size)`` blocks before ``i`` and ``i``.
  Either way the band covers at least the token window of ``ModelConfig.window``.
* the global blocks ``0 .. ceil(global_tokens / block_size) - 1`` (the blocks holding the first
  ``global_tokens`` positions). Bidirectional, a global query block also attends to every key.
  Causal, the global prefix is visible to every later token and itself attends causally.
* ``random_blocks`` random key blocks, drawn without replacement from the blocks not already
  chosen (causal: only from blocks before the band). When fewer candidates exist, all are taken.

Causal attention is exact at token level: inside the diagonal block (and any visible block that
reaches past the query) a key is visible only when its position is <= the query's. ``layout`` gives
the block pattern and ``mask`` the dense token mask the kernel implements, so tests and
``memext.nn.reference.attention`` use exactly the same pattern.

The random draw of query block ``i`` is a pure function of ``(layout_seed, i, step)`` through an
integer hash, not of a generator seeded by the sequence length: in causal mode the row of block
``i`` then depends on ``i`` alone, so a sequence's prefix gets the same pattern whatever its total
length, and KV-cached decoding equals recomputing the whole sequence. The same shapes always give
the same layout, in training and in evaluation.

Computation. For the ``m`` non-global query blocks the selected key/value blocks are gathered into
``(B*H, m, K*block_size, D)`` (``K`` = the most blocks any row selects) and one SDPA call runs with a
small ``(m, block_size, K*block_size)`` mask; bidirectional global query blocks run a separate
dense SDPA over all keys and are concatenated in front. Time and memory are
``O(T * K * block_size)``; no ``T x T`` tensor is built. ``T`` that is not a multiple of
``block_size`` is padded internally (padded keys are never visible) and the output is stripped.
With ``Tq < Tk`` (KV-cached decoding, chunked prefill) the queries sit at the last ``Tq``
positions: the query blocks they fall in are computed with the layout of ``Tk`` keys and the rows
outside ``Tq`` are dropped (a single decoded token costs one query block, ``O(K * block_size)``).

``key_padding`` (``(B, Tk)``, True = real key) hides keys. A query that then has no visible key
gets a zero output (SDPA's convention), where the reference formula gives NaN.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from memext.nn.attention import AttentionKernel, check_inputs, register_attention
from memext.registry import check_int

_MOD = 1 << 31  # hash arithmetic stays below 2**62, so int64 never overflows on any device
_CACHED_TABLES = 8  # layouts kept per kernel (train, eval and a decode in flight fit)


def _hash31(x: Tensor) -> Tensor:
    """A mixing function on int64 tensors with values in [0, 2**31): deterministic everywhere."""
    for mult in (0x2C1B3C6D, 0x297A2D39, 0x5BD1E995):
        x = (x ^ (x >> 15)) * mult % _MOD
    return x ^ (x >> 16)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@register_attention("block_sparse")
class BlockSparseAttention(AttentionKernel):
    """Band + global + random key blocks per query block (BigBird), exact causal masking."""

    def __init__(
        self,
        block_size: int = 64,
        window: int = 256,
        random_blocks: int = 3,
        global_tokens: int = 0,
        layout_seed: int = 0,
    ) -> None:
        super().__init__()
        self.check(block_size, window, random_blocks, global_tokens, layout_seed)
        self.block_size, self.window, self.random_blocks = block_size, window, random_blocks
        self.global_tokens, self.layout_seed = global_tokens, layout_seed
        # (n_blocks, causal, device) -> (key-block table, validity), least recently used first.
        # Bounded: decoding meets a new n_blocks every block_size tokens, and old ones stay unused.
        self._tables: OrderedDict[tuple[int, bool, torch.device], tuple[Tensor, Tensor]] = (
            OrderedDict()
        )

    @classmethod
    def check(
        cls, block_size: int, window: int, random_blocks: int, global_tokens: int, layout_seed: int
    ) -> None:
        check_int(cls.name, "block_size", block_size, 1)
        check_int(cls.name, "window", window, 1)
        check_int(cls.name, "random_blocks", random_blocks, 0)
        check_int(cls.name, "global_tokens", global_tokens, 0)
        check_int(cls.name, "layout_seed", layout_seed, 0)

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, window={self.window}, "
            f"random_blocks={self.random_blocks}, global_tokens={self.global_tokens}"
        )

    # --- the pattern -------------------------------------------------------------------------
    def n_blocks(self, t: int) -> int:
        return _ceil_div(t, self.block_size)

    def global_blocks(self, n_blocks: int) -> int:
        return min(_ceil_div(self.global_tokens, self.block_size), n_blocks)

    def band(self, causal: bool) -> tuple[int, int]:
        """(blocks before, blocks after) the query block that the band covers."""
        if causal:
            return _ceil_div(self.window - 1, self.block_size), 0
        side = _ceil_div(self.window, 2 * self.block_size)
        return side, side

    def random_table(self, n_blocks: int, causal: bool) -> Tensor:
        """(n_blocks, random_blocks) long: the random key blocks of each query block, -1 = none.

        Candidates of block ``i`` are the non-global blocks outside its band (causal: before it),
        a set of at most two ranges; Floyd's algorithm draws ``min(random_blocks, candidates)``
        distinct ones from it with one hash per step, so no ``n x n`` tensor is needed.
        """
        n, r = n_blocks, self.random_blocks
        g = self.global_blocks(n)
        before, after = self.band(causal)
        i = torch.arange(n, dtype=torch.long)
        # Candidates are [g, lo) then [hi, n): everything that is neither global nor in the band.
        lo = (i - before).clamp(min=g)
        hi = (i + after + 1).clamp(min=g) if not causal else torch.full_like(i, n)
        hi = hi.clamp(max=n)
        n_lo = lo - g
        count = n_lo + (n - hi)
        chosen = torch.full((n, r), -1, dtype=torch.long)
        salt = _hash31(torch.tensor(self.layout_seed % _MOD))
        for step in range(r):
            t = count - r + step  # Floyd: choose u in [0, t]; if taken already, take t itself
            u = _hash31((i * 1_000_003 + step * 7_919 + salt) % _MOD) % (t + 1).clamp(min=1)
            taken = (chosen[:, :step] == u[:, None]).any(dim=1)
            pick = torch.where(taken, t, u)
            chosen[:, step] = torch.where(t >= 0, pick, -1)
        # Map the rank among candidates back to a block index.
        block = torch.where(
            chosen < n_lo[:, None], g + chosen, hi[:, None] + chosen - n_lo[:, None]
        )
        return torch.where(chosen >= 0, block, -1)

    def _table(self, n_blocks: int, causal: bool, device: torch.device) -> tuple[Tensor, Tensor]:
        """(n, K) key-block indices per query block, sorted, and their validity (False = unused)."""
        key = (n_blocks, causal, device)
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        n = n_blocks
        g = self.global_blocks(n)
        before, after = self.band(causal)
        before, after = min(before, n - 1), min(after, n - 1)  # a huge window needs no more
        i = torch.arange(n)[:, None]
        band = i + torch.arange(-before, after + 1)[None, :]
        band_ok = (band >= g) & (band < n)  # global blocks already have their own column
        glob = torch.arange(g).expand(n, g)
        glob_ok = glob <= i if causal else torch.ones_like(glob, dtype=torch.bool)
        rand = self.random_table(n, causal)
        cols = torch.cat([glob, band, rand], dim=1)
        ok = torch.cat([glob_ok, band_ok, rand >= 0], dim=1)
        # Valid columns first, in increasing block order; drop the columns no row uses.
        cols, _ = torch.where(ok, cols, n).sort(dim=1)
        width = max(int((cols < n).sum(dim=1).max()), 1)
        cols = cols[:, :width]
        ok = cols < n
        table = (torch.where(ok, cols, 0).to(device), ok.to(device))
        self._tables[key] = table
        if len(self._tables) > _CACHED_TABLES:
            self._tables.popitem(last=False)
        return table

    def layout(self, t: int, causal: bool = True) -> Tensor:
        """(n_blocks, n_blocks) bool: query block i attends to key block j (for ``t`` keys)."""
        n = self.n_blocks(t)
        cols, ok = self._table(n, causal, torch.device("cpu"))
        # Unused slots are sent to a spare column n, dropped after the scatter.
        out = torch.zeros(n, n + 1, dtype=torch.bool)
        out.scatter_(1, torch.where(ok, cols, n), True)
        out = out[:, :n]
        if not causal:
            out[: self.global_blocks(n)] = True  # global query blocks see every key
        return out

    def mask(self, tq: int, tk: int, causal: bool = True) -> Tensor:
        """(tq, tk) bool: the dense token mask the kernel implements (queries = last tq keys)."""
        if not 0 < tq <= tk:
            raise ValueError(f"block_sparse: need 0 < tq <= tk, got tq={tq}, tk={tk}")
        q_pos = torch.arange(tk - tq, tk)
        k_pos = torch.arange(tk)
        blocks = self.layout(tk, causal)
        out = blocks[q_pos // self.block_size][:, k_pos // self.block_size]
        if causal:
            out &= k_pos[None, :] <= q_pos[:, None]
        return out

    # --- the kernel --------------------------------------------------------------------------
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = True,
        key_padding: Tensor | None = None,
    ) -> Tensor:
        check_inputs("block_sparse", q, k, v, key_padding)
        tq, tk = q.shape[2], k.shape[2]
        if key_padding is not None:
            key_padding = key_padding.to(torch.bool)  # SDPA would add a non-bool mask as a bias
        bs = self.block_size
        n = self.n_blocks(tk)
        t_pad = n * bs
        qb0 = (tk - tq) // bs  # first query block; earlier blocks hold only cached keys
        front = tk - tq - qb0 * bs  # queries padded in front so they start on a block boundary
        q = F.pad(q, (0, 0, front, t_pad - tk))  # (B, H, (n - qb0) * bs, D)
        outs = []

        # Bidirectional global query blocks see every key: a plain dense SDPA over g*bs rows.
        g_end = max(qb0, self.global_blocks(n)) if not causal else qb0
        if g_end > qb0:
            rows = (g_end - qb0) * bs
            gmask = None if key_padding is None else key_padding[:, None, None, :]
            outs.append(F.scaled_dot_product_attention(q[:, :, :rows], k, v, attn_mask=gmask))

        m = n - g_end  # query blocks left for the sparse path
        if m > 0:
            outs.append(
                self._sparse(q[:, :, (g_end - qb0) * bs :], k, v, g_end, causal, key_padding)
            )
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out[:, :, front : front + tq]

    def _sparse(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        first: int,
        causal: bool,
        key_padding: Tensor | None,
    ) -> Tensor:
        """Query blocks ``first .. n-1`` against their gathered key blocks, one batched SDPA."""
        b, h, _, d = q.shape
        tk = k.shape[2]
        bs = self.block_size
        n = self.n_blocks(tk)
        m = n - first
        cols, ok = self._table(n, causal, q.device)
        cols, ok = cols[first:], ok[first:]  # (m, K)
        width = cols.shape[1]
        pad = n * bs - tk
        # Heads folded into the batch and query blocks playing SDPA's "heads": q is then a free
        # view, and a mask without key_padding broadcasts over (B*H) without being copied.
        # index_select on flat blocks: a plain copy, faster than advanced indexing with a 2-D index.
        qs = q.reshape(b * h, m, bs, d)
        flat = cols.reshape(-1)
        ks = F.pad(k, (0, 0, 0, pad)).reshape(b * h, n, bs * d).index_select(1, flat)
        vs = F.pad(v, (0, 0, 0, pad)).reshape(b * h, n, bs * d).index_select(1, flat)
        ks, vs = ks.view(b * h, m, width * bs, d), vs.view(b * h, m, width * bs, d)

        offs = torch.arange(bs, device=q.device)
        k_pos = (cols[:, :, None] * bs + offs).reshape(m, width * bs)  # (m, K*bs)
        k_ok = ok.repeat_interleave(bs, dim=1) & (k_pos < tk)  # unused slot or padding: hidden
        mask = k_ok[:, None, :].expand(m, bs, width * bs)
        if causal:
            q_pos = (torch.arange(first, n, device=q.device)[:, None] * bs + offs)[:, :, None]
            mask = mask & (k_pos[:, None, :] <= q_pos)
        if key_padding is not None:
            kp = F.pad(key_padding, (0, pad))[:, k_pos]  # (B, m, K*bs)
            mask = (mask[None] & kp[:, :, None, :])[:, None]  # (B, 1, m, bs, K*bs)
            mask = mask.expand(b, h, m, bs, width * bs).reshape(b * h, m, bs, width * bs)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        return out.reshape(b, h, m * bs, d)
