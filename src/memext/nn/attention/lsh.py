"""Reformer LSH attention: shared query-key, angular hashing, sorted chunks with look-one-back.

Semantics (``LSHAttention``; the dense twin is ``memext.nn.reference.lsh_reference``):

* Shared QK. The keys are the queries, normalised to unit length (as in Reformer: hashing is
  angular, so only the keys' directions should decide who meets whom, while the queries' lengths
  stay a learnable temperature). Scores are ``q · k̂ / sqrt(D)``. The caller passes ``k = q``; in
  the LSH case ``k`` is not read.
* Hashing. For each of ``lsh_rounds`` rounds a random ``(D, buckets/2)`` Gaussian matrix ``R``
  projects the query; its bucket is ``argmax([xR, -xR])`` (random-rotation angular LSH).
  ``lsh_buckets = 0`` means ``max(2, 2 * round(T / lsh_chunk))``.
* Chunks. Per round the positions are sorted by (bucket, position) and cut into chunks of
  ``lsh_chunk``; a query sees the keys of its own chunk and of the previous chunk of the same
  round (the first chunk has none). With ``causal`` a key is visible only if its *original*
  position is not after the query's. Each position occurs once per round, so no key is counted
  twice within a round; pairs that meet in several rounds are not de-duplicated.
* Self. A query's own key gets the score ``SELF_SCORE = -5e4`` instead of its dot product (it
  would otherwise dominate, since ``q · q̂`` is the largest score ``q`` can get). It is finite, so
  a query whose only visible key is itself attends to itself, and no row is ever empty. ``-5e4``
  (reformer-pytorch's value) rather than ``-1e5`` so that it fits in float16.
* Rounds. Each round yields a softmax output ``o_r`` and its log-sum-exp ``l_r``; the result is
  ``Σ_r softmax_r(l_r) · o_r``, i.e. one softmax over the union of the rounds' keys.
* Rotations. In training each call draws fresh rotations from the device's default generator (so
  activation checkpointing and reversible blocks, which replay the RNG state, recompute the same
  buckets); in evaluation they come from a generator seeded with ``lsh_seed``, so evaluation is
  deterministic. They are drawn in the input's dtype on its device.
* Lengths that are not a multiple of ``lsh_chunk`` are padded inside; padded positions get a
  bucket past every real one, so they sort to the end of each round, never change which real
  tokens share a chunk, and are never visible. ``key_padding`` (``(B, T)``, True = real) hides
  keys the same way; a query still sees itself, so padded rows stay finite.
* Cached decoding (``Tq < Tk``). Hashing a cache one token at a time has no meaningful chunking,
  so the queries attend exactly to every visible key (causal, ``key_padding``), with the same
  normalised keys and the same self score; the (Tq, Tk) scores are dense, which suits the short
  Tq of decoding. ``Tq == 1`` is ordinary generation.

Implementation: one stable sort per (batch, head, round); all rounds of all heads are laid out
as one flat sequence of chunks, so a chunk's window (previous chunk, own chunk) is a strided
``unfold`` view of the gathered rows and the wrap-around into another round is masked. The core
(``_LSHCore``) is an autograd Function written by hand: the scores live in one ``(chunks, c, 2c)``
buffer, scaled, masked and exponentiated in place; the rounds merge as one softmax over the union
of their keys and scatter back with ``index_add``. Nothing ``T × T`` is built.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from memext.nn.attention import AttentionKernel, check_inputs, register_attention
from memext.registry import SettingError, check_int

#: The score of a query's own key: large and negative, but finite (see the module docstring).
SELF_SCORE = -5e4

# Hashing projects onto rounds * buckets/2 directions; rows are hashed in blocks so this
# projection never holds more than this many elements at once.
_HASH_BLOCK_ELEMENTS = 1 << 22


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@register_attention("lsh")
class LSHAttention(AttentionKernel):
    """Reformer's LSH attention over shared query-keys (see the module docstring)."""

    shared_qk = True
    prefix_exact = False  # which earlier keys share a chunk depends on how later tokens hash

    def __init__(
        self,
        lsh_chunk: int = 64,
        lsh_buckets: int = 0,
        lsh_rounds: int = 2,
        lsh_seed: int = 0,
    ):
        super().__init__()
        self.check(lsh_chunk, lsh_buckets, lsh_rounds)
        self.chunk = lsh_chunk
        self.buckets = lsh_buckets
        self.rounds = lsh_rounds
        self.seed = lsh_seed

    @classmethod
    def check(cls, lsh_chunk: int, lsh_buckets: int, lsh_rounds: int) -> None:
        check_int(cls.name, "lsh_chunk", lsh_chunk, 1)
        check_int(cls.name, "lsh_rounds", lsh_rounds, 1)
        if not _is_int(lsh_buckets) or lsh_buckets < 0 or lsh_buckets % 2:
            # A bucket is the argmax over [xR, -xR], so buckets come in pairs.
            raise SettingError(cls.name, "lsh_buckets", lsh_buckets, "0 (auto) or an even number")

    def extra_repr(self) -> str:
        return (
            f"chunk={self.chunk}, buckets={self.buckets or 'auto'}, rounds={self.rounds}, "
            f"seed={self.seed}"
        )

    def n_buckets(self, t: int) -> int:
        """Buckets per round for a sequence of ``t`` positions."""
        return self.buckets or max(2, 2 * round(t / self.chunk))

    def rotations(self, d: int, n_buckets: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(D, rounds, n_buckets / 2) Gaussian directions: fresh in training, seeded in eval."""
        shape = (d, self.rounds, n_buckets // 2)
        if self.training:
            return torch.randn(shape, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randn(shape, device=device, dtype=dtype, generator=gen)

    @torch.no_grad()
    def hash(self, q: Tensor) -> Tensor:
        """The buckets ``forward`` would use for ``q`` (B, H, T, D): (rounds, B, H, T) int64.

        Deterministic in eval mode; in training each call draws new rotations.
        """
        b, h, t, d = q.shape
        return self._hash(q.reshape(-1, d), t).view(b, h, t, -1).permute(3, 0, 1, 2)

    def _hash(self, rows: Tensor, t: int) -> Tensor:
        """(rows, rounds) buckets of query rows from sequences of length ``t``."""
        d = rows.shape[-1]
        nb = self.n_buckets(t)
        half = nb // 2
        rot = self.rotations(d, nb, rows.device, rows.dtype).reshape(d, -1)
        out = torch.empty(rows.shape[0], self.rounds, dtype=torch.long, device=rows.device)
        step = max(1, _HASH_BLOCK_ELEMENTS // rot.shape[1])
        for i in range(0, rows.shape[0], step):
            proj = (rows[i : i + step] @ rot).view(-1, self.rounds, half)
            # argmax over [p, -p] without building it: the largest |p| and its sign.
            hi, arg_hi = proj.max(dim=-1)
            lo, arg_lo = proj.min(dim=-1)
            out[i : i + step] = torch.where(hi >= -lo, arg_hi, arg_lo + half)
        return out

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = True,
        key_padding: Tensor | None = None,
    ) -> Tensor:
        check_inputs("lsh", q, k, v, key_padding)
        if q.shape[-2] < k.shape[-2]:
            return _exact_shared_qk(q, k, v, causal, key_padding)
        return self._lsh(q, v, causal, key_padding)

    def _lsh(self, q: Tensor, v: Tensor, causal: bool, key_padding: Tensor | None) -> Tensor:
        b, h, t, d = q.shape
        c, r = self.chunk, self.rounds
        n = -(-t // c)  # chunks per round
        tp = n * c
        dev = q.device
        q_rows, v_rows = q.reshape(-1, d), v.reshape(-1, d)
        with torch.no_grad():
            buckets = self._hash(q_rows, t).view(b, h, t, r).transpose(-1, -2).contiguous()
            if tp > t:  # pad with a bucket past every real one: padding sorts last
                buckets = F.pad(buckets, (0, tp - t), value=self.n_buckets(t))
            # A stable sort keeps equal buckets in position order: (bucket, position) order.
            pos = torch.sort(buckets, dim=-1, stable=True).indices  # (B, H, R, Tp)
            del buckets
            head = torch.arange(b * h, device=dev).view(b, h, 1, 1)
            # Padded slots read some real token's vectors; their keys are hidden below and
            # their outputs stripped, so which one does not matter.
            src = (head * t + pos.clamp(max=t - 1)).view(-1)
            # One dummy chunk in front so every chunk has a "previous" one to unfold over.
            src_ext = torch.cat([src[:c], src])
            # Key positions as the mask sees them: hidden keys get `big`, past every query.
            big = tp
            kpos = pos.clone()
            hidden = pos >= t
            if key_padding is not None:
                real = F.pad(key_padding.to(torch.bool), (0, tp - t), value=False)
                hidden |= ~real.view(b, 1, 1, tp).expand(b, h, r, tp).gather(-1, pos)
            kpos.masked_fill_(hidden, big)
            kpos = torch.cat([kpos.new_full((c,), big), kpos.view(-1)])
            kwin = kpos.unfold(0, 2 * c, c).clone()  # (N, 2c): previous chunk, then own
            # The first chunk of each round would look back into another round (or head).
            kwin.view(-1, n, 2 * c)[:, 0, :c] = big
            if causal:
                qlim = pos.view(-1, c, 1)
                mask = kwin[:, None, :] > qlim  # (N, c, 2c)
            else:
                mask = (kwin == big)[:, None, :]  # (N, 1, 2c)
            dst = (head * tp + pos).view(-1)
            del kpos, kwin, hidden

        out = _LSHCore.apply(q_rows, v_rows, src_ext, dst, pos, mask, c)
        out = out.view(b, h, tp, d)
        return out if tp == t else out[:, :, :t]


def _fold(weights: Tensor, rhs: Tensor, c: int) -> Tensor:
    """Σ over the windows holding each row of ``weightsᵀ @ rhs``: ((N + 1) c, D).

    ``weights`` (N, c, 2c) are per-window (previous chunk, own chunk); window n covers rows
    n and n + 1 of the (N + 1, c, D) result, so its own half lands on row n + 1 and its
    previous half is added onto row n.
    """
    n, _, d = rhs.shape
    grad = rhs.new_empty(n + 1, c, d)
    grad[0].zero_()
    torch.bmm(weights[:, :, c:].transpose(1, 2), rhs, out=grad[1:])
    grad[:-1].baddbmm_(weights[:, :, :c].transpose(1, 2), rhs)
    return grad.view(-1, d)


class _LSHCore(torch.autograd.Function):
    """Gather, chunked shared-QK softmax, round merge and scatter, with a hand-written backward.

    Inputs: ``q_rows``/``v_rows`` (B·H·T, D); ``src`` ((N + 1) c,) the row each sorted slot reads,
    with one dummy chunk in front so every chunk has a previous one to form its window from;
    ``dst`` (N c,) the output row of each sorted slot; ``pos`` (B, H, R, Tp) the sort order;
    ``mask`` (True = hidden) broadcasting to (N, c, 2c). Returns (B·H·Tp, D).

    Why by hand: on CPU every fresh large tensor costs a page fault per 4 KiB, which dominates
    simple elementwise passes, and autograd would keep or create several (N, c, 2c) and
    (N, c, D) tensors (masked copies, unfold gradients, normalised keys, weighted outputs). Here
    the scores live in one buffer, masked and exponentiated in place and saved once; the keys are
    the gathered queries themselves, normalised by scaling score columns; and the rounds merge
    as one softmax over the union of their keys, so the backward needs only ``out``, not the
    per-round outputs or log-sum-exps.
    """

    @staticmethod
    def forward(ctx, q_rows, v_rows, src, dst, pos, mask, c):
        d = q_rows.shape[-1]
        b, h, r, tp = pos.shape
        acc = torch.promote_types(q_rows.dtype, torch.float32)  # softmax statistics
        # Reformer's unit-length keys, folded with 1/sqrt(D) into one scale per key column.
        norm = torch.linalg.vector_norm(q_rows, dim=-1, dtype=acc)
        key_scale = (d**-0.5 / norm.clamp_min(1e-12))[src]  # ((N + 1) c,)
        x = q_rows.index_select(0, src)  # ((N + 1) c, D): sorted queries = raw keys
        sv = v_rows.index_select(0, src)
        p = torch.bmm(x[c:].view(-1, c, d), x.unfold(0, 2 * c, c))  # (N, c, 2c)
        p.mul_(key_scale.unfold(0, 2 * c, c)[:, None, :])
        p.masked_fill_(mask, float("-inf"))
        p.diagonal(offset=c, dim1=1, dim2=2).fill_(SELF_SCORE)
        top = p.amax(dim=-1, keepdim=True)  # finite: the self score is
        p.sub_(top).exp_()
        total = p.sum(dim=-1, keepdim=True, dtype=acc)  # >= exp(SELF - top) > 0
        if r == 1:
            coef = total.reciprocal()
        else:
            # Round r's softmax, weighted by softmax over rounds of its log-sum-exp, is the
            # softmax over all rounds' keys: p_r * w_r / total_r.
            lse = (total.log() + top).view(b, h, r, tp)
            lse_seq = torch.empty_like(lse).scatter_(-1, pos, lse)
            weight = torch.softmax(lse_seq, dim=2).gather(-1, pos)
            coef = weight.view(-1, c, 1) / total
        o = torch.bmm(p, sv.unfold(0, 2 * c, c).transpose(1, 2)).mul_(coef)  # (N, c, D)
        out = q_rows.new_zeros(b * h * tp, d).index_add_(0, dst, o.view(-1, d))
        ctx.c, ctx.rows = c, q_rows.shape[0]
        ctx.save_for_backward(x, sv, p, coef, key_scale, src, dst, out)
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, sv, p, coef, key_scale, src, dst, out = ctx.saved_tensors
        c = ctx.c
        need_q, need_v = ctx.needs_input_grad[:2]
        n, d = p.shape[0], x.shape[-1]
        # Union softmax P = p * coef: dS = P * (dO Vᵀ - <dO, out>), dV = Pᵀ dO.
        g = g_out.index_select(0, dst).view(n, c, d).mul_(coef)  # dO * coef, sorted
        g_q = g_v = None
        if need_v:
            g_v = sv.new_zeros(ctx.rows, d).index_add_(0, src, _fold(p, g, c))
        if need_q:
            along = torch.einsum("md,md->m", g_out, out).to(coef.dtype)[dst].view(n, c, 1)
            g_s = torch.bmm(g, sv.unfold(0, 2 * c, c))  # (N, c, 2c)
            del g
            g_s.sub_(along * coef).mul_(p)  # hidden keys have p == 0, so gradient 0
            g_s.diagonal(offset=c, dim1=1, dim2=2).zero_()  # the self score is a constant
            g_s.mul_(key_scale.unfold(0, 2 * c, c)[:, None, :])  # w.r.t. raw dot products
            u = _fold(g_s, x[c:].view(n, c, d), c)  # w.r.t. raw keys, their scale held fixed
            # Normalised keys ignore their length: drop u's component along x.
            radial = torch.einsum("ld,ld->l", u, x).to(key_scale.dtype)
            radial *= (key_scale * d**0.5) ** 2  # 1 / |x|^2
            u.addcmul_(x, radial[:, None].to(u.dtype), value=-1)
            u[c:].view(n, c, d).baddbmm_(g_s, x.unfold(0, 2 * c, c).transpose(1, 2))  # queries
            del g_s
            g_q = x.new_zeros(ctx.rows, d).index_add_(0, src, u)
        return g_q, g_v, None, None, None, None, None


def _exact_shared_qk(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding: Tensor | None
) -> Tensor:
    """Every visible key, shared-QK scoring and the self score: the ``Tq < Tk`` (cache) case."""
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = q @ (F.normalize(k, dim=-1) * d**-0.5).transpose(-1, -2)  # (B, H, Tq, Tk)
    if causal:
        q_pos = torch.arange(tk - tq, tk, device=q.device)[:, None]
        scores.masked_fill_(torch.arange(tk, device=q.device) > q_pos, float("-inf"))
    if key_padding is not None:
        scores.masked_fill_(~key_padding.to(torch.bool)[:, None, None, :], float("-inf"))
    scores.diagonal(offset=tk - tq, dim1=-2, dim2=-1).fill_(SELF_SCORE)
    return torch.softmax(scores, dim=-1) @ v
