"""The ``retrieval`` KV-cache policy: training-free memory for a pretrained model (InfLLM-style).

Each layer keeps, for attention, the first ``sinks`` tokens and a local part of the newest ones;
what leaves the local part is stored in blocks of ``block`` tokens, each with ``reps``
representative keys. Every forward (a prefill chunk or one decoded token) scores the stored
blocks against its queries and brings the ``topk`` best back into attention. Anchors: InfLLM
(Xiao et al. 2024, block memory with representative tokens) and Memorizing Transformers' kNN
attention, here applied at inference to a model that was never trained for it.

What a chunk of T queries read after ``pos`` tokens sees (``plan``): the s = min(pos, sinks)
sinks; the n = min(topk, blocks stored) retrieved blocks, oldest first; the local tokens
[sinks + blocks·block, pos), between ``window - 1`` and ``window + block - 2`` of them (a token
leaves the local part only when its whole block goes to the store); the chunk itself, causally.
No band: every query of a chunk sees all the local tokens, so a one-shot prompt of Hugging Face's
``generate`` reads what a prefill reads in one chunk with ``tail=0``.

Positions: keys are stored *before* rotary and rotated on read at the positions of the cache,
0, 1, ... in the order above, as the ``sinks`` policy does; the next token sits at
``position(pos)`` = sinks + retrieved tokens + local tokens. So a retrieved block sits right
before the local part at positions its own tokens never held, and no position ever exceeds
sinks + topk·block + window + block + chunk, which the caller keeps inside the length the model
was trained at. When every stored block is retrieved (budget >= input) the positions are the
true ones and the policy computes what ``full`` computes. (InfLLM instead places every token
beyond the local window at one fixed distance; that needs two rotations of each query, which the
one-attention cache contract cannot express.)

Block scores. A block's representatives are the ``reps`` of its tokens that received the most
attention from the queries that came after them while they were local (InfLLM's rule: a token
the model attends to nearby is a token a later query may look for). A query's softmax weight
over the local part is taken relative to a uniform spread (times the number of tokens it sees)
and averaged over the (query, head) pairs of the KV head's group that saw the token, so that
neither the first tokens of the input (whose first queries see few tokens) nor the oldest of a
block (seen by more queries) are favoured. A chunk scores
a block, per KV head, by max over its representatives of (mean query of the chunk and of the
head's query group) · key, all before rotary (position-free: no distance is baked into the
score). Each KV head retrieves its own ``topk`` blocks (Memorizing Transformers retrieves per
head too; InfLLM shares one choice across heads); all heads retrieve the same number, so
positions stay one sequence per layer. Variants, off by default (``group="max"`` alone did not
fix a 32k SmolLM2 miss; the others are not measured yet): ``group="max"`` (a block's score is
the best of the group's query heads, not of their mean query), ``share="layer"`` (one choice
per layer, scores summed over its KV heads),
``hold="prompt"`` (decoded tokens read the blocks the prompt's last chunk chose).

``score="rope"`` (session 14) scores as full attention would: the representatives are kept
rotated at the positions they held in the input, the chunk's last ``ROPE_QUERIES`` queries are
rotated at theirs, and a block's score is the logsumexp of its logits over the group's query
heads and its representatives, max over those queries. The position-free score is the logit at
distance 0, where RoPE's fast-turning dimensions count fully; at the true distance they
average out, as in full attention. On SmolLM2 in a stdlib (Python source) haystack, where
the position-free score found the key's block barely more often than chance, it reads far
more passkeys (docs/results.md, "Block selection in varied text"); but in repetitive filler at
32k, where every block matches alike, its logits favour the nearest blocks (RoPE's long-range
decay) and it misses the far key the position-free score finds. So it is off by default.

The prompt's end (``tail``, off by default). A chunk's mean query chooses its blocks, and the
chunk that ends a prompt writes the first answer token; inside a 256-token chunk of filler the
question's own queries weigh little. ``tail`` makes a prompt's last ``tail`` tokens a forward of
their own (``memext.infer.prefill.spans``, used by every prefill and by the suite's readings).
On one 32k SmolLM2 miss, the question's 24 tokens alone found the pass key; over 20 samples
``tail=32`` scored 0.65 against 0.75 without it, so it stays off.

Local scores are computed in pieces of ``SCORE_PIECE`` queries against the local tokens within
``window + block`` of each query, so their cost follows the window, not the chunk.

Bytes. ``nbytes()`` is what attention works from between calls, allocated up front and flat:
``L·B·H·(2·(s + w + b − 2 + k·b)·D·e + 8·(w + b − 2))`` (sinks, local part and its fp32 scores,
and the buffer the retrieved blocks are copied into). ``store_nbytes()`` is the block store,
which grows with the input: per stored block per head per layer 2·b·D·e (keys and values, on
``store_device``, CPU RAM by default, or memory-mapped files under ``store_dir``; in pages of
``PAGE_BLOCKS`` blocks so that growing never copies them) + r·D·e (representatives, on the model's device, in capacity that doubles).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memext.infer.cache import (
    CachePolicy,
    Rotation,
    _check_positive,
    _need_rotary,
    layer_heads,
    register_cache,
)
from memext.nn.rotary import apply_rotary

#: Queries per piece when scoring local tokens (bounds that step's scores to piece x local).
SCORE_PIECE = 128
#: Blocks per page of the block store.
PAGE_BLOCKS = 64
#: score="rope": the chunk's last queries that score the stored blocks (all of a shorter chunk).
ROPE_QUERIES = 32

CosSin = Callable[[int, int], tuple[Tensor, Tensor]]


class Rotations:
    """(cos, sin) (stop - start, D) at positions [start, stop), from ``compute(positions)``; the
    last few asked for are kept, since every layer of a forward asks for the same ones."""

    def __init__(
        self, compute: Callable[[Tensor], tuple[Tensor, Tensor]], device: Any, keep: int = 4
    ):
        self.compute, self.device, self.keep = compute, torch.device(device), keep
        self._kept: OrderedDict[tuple[Any, ...], tuple[Tensor, Tensor]] = OrderedDict()

    def __call__(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        key = (start, stop, self.device)
        if key not in self._kept:
            self._kept[key] = self.compute(torch.arange(start, stop, device=self.device))
            if len(self._kept) > self.keep:
                self._kept.popitem(last=False)
        return self._kept[key]


def plan(pos: int, sinks: int, window: int, block: int) -> tuple[int, int, int]:
    """After ``pos`` tokens: (sinks kept, blocks stored, local tokens kept).

    Blocks cover tokens [sinks, sinks + blocks·block); the local part is the rest, at least
    ``window - 1`` tokens once there are that many, fewer than ``window - 1 + block`` always.
    """
    n_sinks = min(pos, sinks)
    rest = pos - n_sinks
    n_blocks = max(0, (rest - (window - 1)) // block)
    return n_sinks, n_blocks, rest - n_blocks * block


@register_cache("retrieval")
class Retrieval(CachePolicy):
    """Sinks, a local window and the ``topk`` most relevant stored blocks (see the module doc).

    ``rotary`` is the model's ``Rotary``: memext's cache rotates keys at cache positions; a
    Hugging Face cache takes the rotary from the model's config instead. ``store_device`` holds
    the evicted blocks (default CPU RAM); ``store_dir`` puts them on disk instead, as
    memory-mapped files in a fresh folder under it (removed with the cache), which the operating
    system pages in when a block is read: the store is then bounded by the disk, not the RAM.
    """

    reads_queries = True

    def __init__(
        self,
        sinks: int | None = None,
        window: int | None = None,
        block: int = 128,
        topk: int = 16,
        reps: int = 4,
        group: str = "mean",
        share: str = "head",
        hold: str = "token",
        score: str = "free",
        tail: int = 0,
        store_device: str = "cpu",
        store_dir: str | None = None,
        rotary: Rotation | None = None,
    ) -> None:
        _check_positive(sinks=sinks, window=window, block=block, topk=topk, reps=reps)
        if reps > block:
            raise ValueError(
                f"reps={reps} representative keys cannot come from a block of {block} tokens: "
                "choose reps <= block"
            )
        self.sinks, self.window, self.block, self.topk, self.reps = sinks, window, block, topk, reps
        for name, value, allowed in (
            ("group", group, ("mean", "max")),
            ("share", share, ("head", "layer")),
            ("hold", hold, ("token", "prompt")),
            ("score", score, ("free", "rope")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if score == "rope" and group != "mean":
            raise ValueError(
                f"group={group!r} chooses how score='free' combines a group's queries; "
                "score='rope' combines them its own way (logsumexp): drop one of them"
            )
        self.group, self.share, self.hold, self.score = group, share, hold, score
        if not isinstance(tail, int) or tail < 0:
            raise ValueError(f"tail must be a number of tokens >= 0, got {tail!r}")
        self.tail = tail
        try:
            self.store_device = torch.device(store_device)
        except RuntimeError:
            raise ValueError(
                f"store_device must name a torch device such as 'cpu', got {store_device!r}"
            ) from None
        if store_dir is not None:
            if self.store_device.type != "cpu":
                raise ValueError(
                    f"store_dir keeps the block store in memory-mapped files, which live on the "
                    f"CPU: drop store_device={store_device!r} or store_dir"
                )
            if not Path(store_dir).is_dir():
                raise ValueError(f"store_dir={store_dir!r} is not an existing folder")
        self.store_dir = store_dir
        self.rotary = rotary

    @classmethod
    def covering(cls, tokens: int) -> dict[str, Any]:
        # Small window and blocks, so that tokens go through the store, but every block back:
        # at true positions, exactly full attention.
        return {"sinks": 2, "window": 4, "block": 4, "topk": max(1, tokens)}

    def plan(self, pos: int) -> tuple[int, int, int]:
        return plan(pos, self.sinks, self.window, self.block)

    def held(self, pos: int) -> int:
        """Keys a chunk read after ``pos`` tokens sees before its own: also the position of the
        next token."""
        n_sinks, n_blocks, n_local = self.plan(pos)
        return n_sinks + min(self.topk, n_blocks) * self.block + n_local

    def rotation(self) -> Rotation:
        return _need_rotary(self.rotary, "the retrieval cache")

    def make_layer(
        self,
        batch: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        cos_sin: CosSin,
    ) -> RetrievalLayer:
        """One layer's storage; ``cos_sin(start, stop)`` gives the (cos, sin) at positions
        [start, stop) to score with (a ``Rotations``)."""
        return RetrievalLayer(self, batch, n_heads, head_dim, dtype, device, cos_sin)

    def allocate(
        self,
        n_layers: int,
        batch: int,
        n_heads: int | Sequence[int],
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> RetrievalCache:
        rotary = self.rotation()

        cos_sin = Rotations(lambda positions: rotary(positions, seq_len=len(positions)), device)
        layers = [
            self.make_layer(batch, h, head_dim, dtype, device, cos_sin)
            for h in layer_heads(n_heads, n_layers)
        ]
        return RetrievalCache(self, layers)


class RetrievalLayer:
    """One layer's sinks, local part, local scores, retrieval buffer and block store.

    ``step(start, k, v, q)`` takes the chunk's keys, values (B, H, T, D) and queries
    (B, H·g, T, D), all before rotary, with ``start`` tokens read before it; it returns the keys
    (before rotary) and values the chunk attends to, in cache-position order (module doc), and
    stores the chunk. ``selected`` is then the (B, H, n) blocks retrieved for it, oldest first
    (None when no block was stored yet).
    """

    def __init__(
        self,
        policy: Retrieval,
        batch: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        cos_sin: CosSin,
    ):
        self.policy, self.cos_sin = policy, cos_sin
        p = policy
        self.capacity = p.window - 1 + p.block - 1  # the local part's most tokens
        self.shape = (batch, n_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)

        def empty(n: int, *, dims: tuple[int, ...] = (head_dim,), dt: Any = dtype) -> Tensor:
            return torch.zeros(batch, n_heads, n, *dims, dtype=dt, device=device)

        self.sink_k, self.sink_v = empty(p.sinks), empty(p.sinks)
        self.local_k, self.local_v = empty(self.capacity), empty(self.capacity)
        # Per local token: attention received relative to uniform, summed; queries that saw it.
        self.local_score = empty(self.capacity, dims=(2,), dt=torch.float32)
        self.fetch_k, self.fetch_v = empty(p.topk * p.block), empty(p.topk * p.block)
        self.n_blocks = 0
        # Keys and values of stored blocks, in pages of PAGE_BLOCKS blocks on ``store_device``:
        # growing never copies what is stored (at 128k tokens a SmolLM2 store is ~6 GB).
        self.pages_k: list[Tensor] = []
        self.pages_v: list[Tensor] = []
        self.store_reps: Tensor | None = None
        self._folder: str | None = None  # the memory-mapped pages' folder (``store_dir``)
        self.selected: Tensor | None = None

    # --- reading ------------------------------------------------------------------------------
    def step(self, start: int, k: Tensor, v: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        p = self.policy
        if q.shape[-2] != k.shape[-2] or q.shape[1] % k.shape[1]:
            raise ValueError(
                f"the retrieval cache needs this chunk's queries: got queries {tuple(q.shape)} "
                f"for keys {tuple(k.shape)} (B, heads, T, head_dim; query heads a multiple of "
                "key heads)"
            )
        n_sinks, n_blocks, n_local = p.plan(start)
        if n_blocks != self.n_blocks:
            raise ValueError(
                f"the retrieval cache holds {self.n_blocks} blocks but {start} tokens read "
                f"make {n_blocks}: each layer must see every chunk once, in order"
            )
        keys = [self.sink_k[:, :, :n_sinks]]
        values = [self.sink_v[:, :, :n_sinks]]
        held = self.selected if p.hold == "prompt" and k.shape[-2] == 1 else None
        if held is not None and held.shape[-1] != min(p.topk, n_blocks):
            held = None  # the prompt chose among fewer blocks than there now are
        self.selected = None
        if n_blocks:
            # hold=prompt: a decoded token reads the blocks the prompt's last chunk chose.
            self.selected = held if held is not None else self._select(q, n_blocks, start)
            fk, fv = self._fetch(self.selected)
            keys.append(fk)
            values.append(fv)
        keys += [self.local_k[:, :, :n_local], k]
        values += [self.local_v[:, :, :n_local], v]
        out_k = torch.cat([x.to(k.dtype) for x in keys], dim=-2)
        out_v = torch.cat([x.to(v.dtype) for x in values], dim=-2)
        self._write(start, k, v, q)
        return out_k, out_v

    def _select(self, q: Tensor, n_blocks: int, start: int) -> Tensor:
        """(B, H, min(topk, n_blocks)) indices of the blocks to retrieve, ascending."""
        b, h, _ = self.shape
        topk = self.policy.topk
        if n_blocks <= topk:
            return torch.arange(n_blocks, device=self.device).expand(b, h, n_blocks)
        reps = self.store_reps[:, :, :n_blocks].float()  # (B, H, N, r, D)
        if self.policy.score == "rope":
            scores = self._rope_scores(reps, q, start)
        else:
            scores = self._free_scores(reps, q)
        if self.policy.share == "layer":  # one choice for every KV head of the layer
            scores = scores.sum(dim=1, keepdim=True).expand(b, h, n_blocks)
        return scores.topk(topk, dim=-1).indices.sort(dim=-1).values

    def _free_scores(self, reps: Tensor, q: Tensor) -> Tensor:
        """(B, H, N): the chunk's mean query · each representative, before rotary, max over
        the block's representatives (and over the group's query heads with group=max)."""
        b, h, _ = self.shape
        # The chunk's mean query per query head, before rotary: (B, H, g, D).
        mean_q = q.float().mean(dim=2).reshape(b, h, -1, q.shape[-1])
        if self.policy.group == "mean":  # one mean query for the KV head's group
            mean_q = mean_q.mean(dim=2, keepdim=True)
        return torch.einsum("bhnrd,bhgd->bhngr", reps, mean_q).flatten(3).amax(-1)

    def _rope_scores(self, reps: Tensor, q: Tensor, start: int) -> Tensor:
        """(B, H, N): the attention logits full attention would give, the chunk's queries
        rotated at their true positions against representatives stored rotated at theirs;
        logsumexp over the group's query heads and the block's representatives (the block's
        share of the group's attention, up to the softmax's normaliser), max over the chunk's
        last ROPE_QUERIES queries (a block one of them would read is read). The last queries,
        not all: they are the ones nearest what is read next (the answer, after a prompt), and
        scoring every query of a 256-token chunk made a 30k-token read ~5x slower."""
        b, h, d = self.shape
        t = q.shape[-2]
        first = max(0, t - ROPE_QUERIES)
        cos, sin = self.cos_sin(start + first, start + t)
        looks = apply_rotary(q[:, :, first:].float(), cos, sin)  # (B, H·g, t', D)
        looks = looks.reshape(b, h, -1, d)  # (B, H, g·t', D): a query group per KV head
        n, r = reps.shape[2], reps.shape[3]
        logits = reps.reshape(b, h, n * r, d) @ looks.transpose(-1, -2) / d**0.5
        logits = logits.view(b, h, n, r, -1, t - first)  # (B, H, N, r, g, t')
        return logits.logsumexp(dim=(3, 4)).amax(dim=-1)

    def _fetch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The blocks ``index`` (B, H, n), copied into the retrieval buffer: (B, H, n·block, D)."""
        b, h, d = self.shape
        n, size = index.shape[-1], self.policy.block
        flat = index.reshape(b * h, n).to(self.policy.store_device)
        page, offset = flat // PAGE_BLOCKS, flat % PAGE_BLOCKS
        got = []
        for pages, buffer in ((self.pages_k, self.fetch_k), (self.pages_v, self.fetch_v)):
            picked = torch.empty(b * h, n, size, d, dtype=self.dtype, device=flat.device)
            for p in page.unique().tolist():  # at most n·B·H pages, usually a few
                rows, cols = (page == p).nonzero(as_tuple=True)
                stored = pages[p].view(b * h, PAGE_BLOCKS, size, d)
                picked[rows, cols] = stored[rows, offset[rows, cols]]
            dest = buffer[:, :, : n * size]
            dest.copy_(picked.reshape(b, h, n * size, d))
            got.append(dest)
        return got[0], got[1]

    # --- writing ------------------------------------------------------------------------------
    def _write(self, start: int, k: Tensor, v: Tensor, q: Tensor) -> None:
        p = self.policy
        t = k.shape[-2]
        _, _, n_local = p.plan(start)
        to_sinks = min(t, max(0, p.sinks - start))
        if to_sinks:
            self.sink_k[:, :, start : start + to_sinks] = k[:, :, :to_sinks]
            self.sink_v[:, :, start : start + to_sinks] = v[:, :, :to_sinks]
        if to_sinks == t:
            return
        # Candidates: the local part, then the chunk's tokens past the sinks.
        cand_k = torch.cat((self.local_k[:, :, :n_local], k[:, :, to_sinks:].to(self.dtype)), -2)
        cand_v = torch.cat((self.local_v[:, :, :n_local], v[:, :, to_sinks:].to(self.dtype)), -2)
        fresh = torch.zeros(*cand_k.shape[:2], t - to_sinks, 2, device=self.device)
        score = torch.cat((self.local_score[:, :, :n_local], fresh), dim=2)
        first = start + to_sinks - n_local  # the first candidate's position in the sequence
        self._score(score, cand_k, first, q, start)
        _, blocks_after, local_after = p.plan(start + t)
        n_new = blocks_after - self.n_blocks
        cut = n_new * p.block
        if n_new:
            self._store(cand_k[:, :, :cut], cand_v[:, :, :cut], score[:, :, :cut], n_new)
        assert cand_k.shape[-2] - cut == local_after  # the plan and the storage agree
        self.local_k[:, :, :local_after] = cand_k[:, :, cut:]
        self.local_v[:, :, :local_after] = cand_v[:, :, cut:]
        self.local_score[:, :, :local_after] = score[:, :, cut:]

    def _score(self, score: Tensor, cand_k: Tensor, first: int, q: Tensor, start: int) -> None:
        """Add to ``score`` (B, H, M, 2) the softmax weight each candidate key receives from
        each query of the chunk (over the candidates within ``window + block`` before it) times
        the number of candidates that query sees, i.e. relative to a uniform spread, and the
        number of (query, head) pairs that saw it."""
        b, h, d = self.shape
        p = self.policy
        t, m = q.shape[-2], cand_k.shape[-2]
        span = p.window + p.block
        for i0 in range(0, t, SCORE_PIECE):
            i1 = min(t, i0 + SCORE_PIECE)
            # Candidates some query of the piece sees: positions in (start+i0-span, start+i1).
            j0 = max(0, start + i0 - span + 1 - first)
            j1 = min(m, start + i1 - first)
            if j1 <= j0:
                continue
            # Rotate at small positions from ``base``: only distances matter.
            base = min(first + j0, start + i0)
            cos, sin = self.cos_sin(0, start + i1 - base)
            at = slice(first + j0 - base, first + j1 - base)
            keys = apply_rotary(cand_k[:, :, j0:j1].float(), cos[at], sin[at])
            at = slice(start + i0 - base, start + i1 - base)
            piece = apply_rotary(q[:, :, i0:i1].float(), cos[at], sin[at])
            piece = piece.reshape(b, h, -1, d)  # (B, H, g·P, D): a query group per KV head
            logits = piece @ keys.transpose(-1, -2) / d**0.5  # (B, H, g·P, J)
            q_pos = torch.arange(start + i0, start + i1, device=self.device)
            k_pos = torch.arange(first + j0, first + j1, device=self.device)
            dist = q_pos[:, None] - k_pos[None]  # (P, J)
            seen = (dist >= 0) & (dist < span)
            logits = logits.view(b, h, -1, i1 - i0, j1 - j0).masked_fill(~seen, float("-inf"))
            weights = torch.nan_to_num(logits.softmax(dim=-1))  # a row may see nothing
            # Relative to uniform: the first queries, seeing few tokens, would otherwise give
            # each of them a large share and favour the first tokens of the input.
            relative = weights * seen.sum(dim=-1, keepdim=True)
            score[:, :, j0:j1, 0] += relative.sum(dim=(2, 3))
            score[:, :, j0:j1, 1] += seen.sum(dim=0) * (q.shape[1] // h)

    def _store(self, k: Tensor, v: Tensor, score: Tensor, n_new: int) -> None:
        """Append ``n_new`` blocks (B, H, n_new·block, D) and their representatives."""
        b, h, d = self.shape
        size, r = self.policy.block, self.policy.reps
        blocks_k = k.reshape(b, h, n_new, size, d)
        blocks_v = v.reshape(b, h, n_new, size, d)
        mean = score[..., 0] / score[..., 1].clamp(min=1)  # over the queries that saw each
        top = mean.reshape(b, h, n_new, size).topk(r, dim=-1).indices  # (B, H, n, r)
        if self.policy.score == "rope":
            # Rotated once, at the positions these tokens held in the input (never change).
            first = self.policy.sinks + self.n_blocks * size
            cos, sin = self.cos_sin(first, first + n_new * size)
            rotated = apply_rotary(k.float(), cos, sin).to(self.dtype)
            blocks_k_scored = rotated.reshape(b, h, n_new, size, d)
        else:
            blocks_k_scored = blocks_k
        reps = blocks_k_scored.gather(3, top[..., None].expand(-1, -1, -1, -1, d))  # (B,H,n,r,D)
        end = self.n_blocks + n_new
        self._reserve_reps(end)
        self.store_reps[:, :, self.n_blocks : end] = reps
        done = 0
        while done < n_new:  # page by page: a page is allocated whole, and never moves
            at = self.n_blocks + done
            page, offset = divmod(at, PAGE_BLOCKS)
            if page == len(self.pages_k):
                shape = (b, h, PAGE_BLOCKS, size, d)
                self.pages_k.append(self._new_page(shape, f"{page}-keys"))
                self.pages_v.append(self._new_page(shape, f"{page}-values"))
            m = min(n_new - done, PAGE_BLOCKS - offset)
            self.pages_k[page][:, :, offset : offset + m] = blocks_k[:, :, done : done + m]
            self.pages_v[page][:, :, offset : offset + m] = blocks_v[:, :, done : done + m]
            done += m
        self.n_blocks = end

    def _new_page(self, shape: tuple[int, ...], name: str) -> Tensor:
        """A zeroed page in RAM on ``store_device``, or a memory-mapped file under ``store_dir``."""
        if self.policy.store_dir is None:
            return torch.zeros(shape, dtype=self.dtype, device=self.policy.store_device)
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="memext-kv-", dir=self.policy.store_dir)
            # The files go when the layer does (or at exit), whatever ends the read.
            weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        path = str(Path(self._folder) / f"{name}.bin")
        return torch.from_file(path, shared=True, size=math.prod(shape), dtype=self.dtype).view(
            shape
        )

    def _reserve_reps(self, n: int) -> None:
        """Grow the representatives (capacity doubling; r of every block's keys) to ``n``."""
        have = 0 if self.store_reps is None else self.store_reps.shape[2]
        if n <= have:
            return
        b, h, d = self.shape
        grown = torch.zeros(
            b, h, max(n, 2 * have, 4), self.policy.reps, d, dtype=self.dtype, device=self.device
        )
        if self.store_reps is not None:
            grown[:, :, :have] = self.store_reps
        self.store_reps = grown

    # --- bytes ------------------------------------------------------------------------------
    def nbytes(self) -> int:
        held = (self.sink_k, self.sink_v, self.local_k, self.local_v, self.local_score)
        held += (self.fetch_k, self.fetch_v)
        return sum(x.numel() * x.element_size() for x in held)

    def store_nbytes(self) -> int:
        stores = [*self.pages_k, *self.pages_v]
        stores += [self.store_reps] if self.store_reps is not None else []
        return sum(x.numel() * x.element_size() for x in stores)


class RetrievalCache:
    """memext's cache contract over a ``RetrievalLayer`` per model layer: keys come in before
    rotary with the chunk's queries (``reads_queries``) and go out rotated at cache positions."""

    rotates_keys = True
    reads_queries = True
    unbounded = True

    def __init__(self, policy: Retrieval, layers: list[RetrievalLayer]):
        self.policy, self.layers = policy, layers
        self.rotary = policy.rotation()
        self.seq_len = 0
        self._rotation: tuple[int, torch.device, Tensor, Tensor] | None = None

    def update(
        self, layer: int, k: Tensor, v: Tensor, queries: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if queries is None:
            raise ValueError(
                "the retrieval cache chooses blocks by the chunk's queries: pass "
                "update(layer, k, v, queries=q) (memext's attention does when the cache has "
                "reads_queries)"
            )
        keys, values = self.layers[layer].step(self.seq_len, k, v, queries)
        n = keys.shape[-2]
        if self._rotation is None or self._rotation[:2] != (n, keys.device):
            cos, sin = self.rotary(torch.arange(n, device=keys.device), seq_len=n)
            self._rotation = (n, keys.device, cos, sin)
        return apply_rotary(keys, *self._rotation[2:]), values

    def mask(self, t: int) -> None:
        return None  # plain causal: every query sees all it is given

    def position(self, pos: int) -> int:
        return self.policy.held(pos)

    def advance(self, t: int) -> None:
        self.seq_len += t

    def nbytes(self) -> int:
        """Bytes attention works from (flat; the formula is in the module doc)."""
        return sum(layer.nbytes() for layer in self.layers)

    def store_nbytes(self) -> int:
        """Bytes of the block store (grows with the input)."""
        return sum(layer.store_nbytes() for layer in self.layers)
