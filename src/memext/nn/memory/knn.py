"""Memorizing Transformer (Wu et al. 2022): one layer retrieves from a store of every past key.

Every layer attends locally like ``xl`` (its ``mem_len`` memory + the current segment). One
layer, ``knn_layer``, also keeps every key and value it has seen in earlier segments; each of its
queries takes its ``knn_topk`` best keys from that store by dot product, attends over those alone
(softmax, scale 1/sqrt(D)) and mixes the result with the local attention through a learned
per-head gate: ``y = g * y_mem + (1 - g) * y_local`` with ``g = sigmoid(gate)``.

- Keys and queries are the projections *before* rotary: a memory is found by its content, not by
  how far back it lies. Values are stored as they are.
- The store is written detached (the paper does not backprop into memory) and *after* the current
  segment has been read, so it holds earlier segments only; the local attention covers this one.
- ``knn_max > 0`` caps the store per row, oldest first. Columns no row still holds (all reset) are
  dropped from the front, so a stream of reset documents does not grow the store forever.
- Top-k is exact: ``torch.topk`` over chunks of queries, or faiss (``IndexFlatIP``, exact inner
  product, for big stores on CPU). Either way only the *indices* come from the search; the scores
  are recomputed in torch from the gathered keys, so gradients reach the queries and the gate.
- A row with no valid entry (first segment, or just reset) gets exactly ``y_local``, so an empty
  store computes what ``xl`` (and, with ``mem_len=0``, the plain model) computes.

State: ``xl``'s keys (``k.{layer}``, ``v.{layer}``, ``valid``) and ``knn.k``, ``knn.v``
(B, H, N, D) and ``knn.valid`` (B, N), False for the entries of rows that were reset.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from memext.nn.memory import MemoryState, MemoryStep, keep_rows, register_memory
from memext.nn.memory.xl import XLMemory
from memext.registry import SettingError, check_choice, check_int

BACKENDS = ("torch", "faiss")
#: Score elements (B * H * queries * N) one top-k chunk may hold: 2^24 fp32 = 64 MiB.
CHUNK_ELEMENTS = 1 << 24


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "knn_backend='faiss' needs faiss: pip install faiss-cpu (or use knn_backend='torch')"
        ) from None
    return faiss


@torch.no_grad()
def topk_indices(q: Tensor, keys: Tensor, valid: Tensor, k: int, backend: str = "torch") -> Tensor:
    """Indices (B, H, Tq, k') into the store of each query's best valid keys by dot product.

    q (B, H, Tq, D), keys (B, H, N, D), valid (B, N); k' = min(k, N). A row with fewer than k'
    valid keys pads its list with -1. Best first; no gradient (the search is not differentiable).
    """
    k = min(k, keys.shape[-2])
    if backend == "faiss":
        return _faiss_topk(q, keys, valid, k)
    b, h, tq, _ = q.shape
    n = keys.shape[-2]
    keys = keys.to(q.dtype)
    hidden = ~valid[:, None, None, :]
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * n))
    out = []
    for s in range(0, tq, chunk):  # bounded memory: never the whole (B, H, Tq, N) at once
        scores = q[:, :, s : s + chunk] @ keys.transpose(-2, -1)
        out.append(scores.masked_fill_(hidden, float("-inf")).topk(k, dim=-1).indices)
    idx = torch.cat(out, dim=2)
    found = valid[torch.arange(b, device=q.device)[:, None, None, None], idx]
    return idx.masked_fill_(~found, -1)


def _faiss_topk(q: Tensor, keys: Tensor, valid: Tensor, k: int) -> Tensor:
    faiss = _faiss()
    b, h, tq, d = q.shape
    idx = torch.full((b, h, tq, k), -1, dtype=torch.long)
    qs = q.detach().float().cpu().numpy()
    ks = keys.detach().float().cpu().numpy()
    for row in range(b):
        where = valid[row].nonzero().squeeze(-1).cpu()  # the row's valid store positions
        if where.numel() == 0:
            continue
        for head in range(h):
            index = faiss.IndexFlatIP(d)  # exact inner product over this row's and head's keys
            index.add(ks[row, head, where.numpy()].copy())
            _, found = index.search(qs[row, head].copy(), k)
            found = torch.from_numpy(found)
            hit = found >= 0  # faiss pads with -1 when the row has fewer than k keys
            idx[row, head] = torch.where(hit, where[found.clamp(min=0)], -1)
    return idx.to(q.device)


def knn_attention(
    q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, k: int, backend: str = "torch"
) -> Tensor:
    """Each query attends over its top-k valid stored keys: (B, H, Tq, D).

    The search picks indices without gradient; the scores of the picked keys are recomputed from
    ``q`` so the result is differentiable in ``q`` (and in ``keys``/``values``, should they carry
    gradients). A query with no valid key gets zeros.
    """
    idx = topk_indices(q, keys, valid, k, backend)  # (B, H, Tq, k')
    b, h = q.shape[:2]
    found = idx >= 0
    rows = torch.arange(b, device=q.device)[:, None, None, None]
    heads = torch.arange(h, device=q.device)[None, :, None, None]
    pick = idx.clamp(min=0)
    k_sel = keys[rows, heads, pick].to(q.dtype)  # (B, H, Tq, k', D)
    v_sel = values[rows, heads, pick].to(q.dtype)
    scores = torch.einsum("bhqd,bhqkd->bhqk", q, k_sel) / math.sqrt(q.shape[-1])
    any_found = found.any(dim=-1, keepdim=True)
    # Missing picks get -inf; a query with none gets finite zeros so nothing becomes NaN (its
    # output is zeroed below, and a NaN would poison the gradient even through a where).
    scores = scores.masked_fill(~found, float("-inf")).masked_fill(~any_found, 0.0)
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    y = torch.einsum("bhqk,bhqkd->bhqd", weights, v_sel)
    return y.masked_fill(~any_found, 0.0)


@register_memory("knn")
class KNNMemory(XLMemory):
    """``xl`` in every layer, plus kNN retrieval from all past keys in ``knn_layer``."""

    # Its gate mixes memory and local attention per head of the full count.
    prunable = False

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        mem_len: int = 0,
        knn_layer: int = -1,
        knn_topk: int = 32,
        knn_max: int = 0,
        knn_backend: str = "torch",
    ):
        self.check(n_layers, n_heads, mem_len, knn_layer, knn_topk, knn_max, knn_backend)
        super().__init__(mem_len)
        if knn_backend == "faiss":
            _faiss()  # fail at build time, not at the first segment with a store
        self.layer = knn_layer % n_layers
        self.topk = knn_topk
        self.max = knn_max
        self.backend = knn_backend
        # sigmoid(0) = 1/2: memory and local attention start equally weighted. 1-dim, so the
        # model's N(0, std) init leaves it alone.
        self.gate = nn.Parameter(torch.zeros(n_heads))

    @classmethod
    def check(
        cls,
        n_layers: int,
        n_heads: int,
        mem_len: int,
        knn_layer: int,
        knn_topk: int,
        knn_max: int,
        knn_backend: str,
    ) -> None:
        super().check(mem_len)
        check_int(cls.name, "n_layers", n_layers, 1)
        check_int(cls.name, "n_heads", n_heads, 1)
        if not -n_layers <= knn_layer < n_layers:
            accepted = f"a layer index in [-{n_layers}, {n_layers})"
            raise SettingError(cls.name, "knn_layer", knn_layer, accepted)
        check_int(cls.name, "knn_topk", knn_topk, 1)
        check_int(cls.name, "knn_max", knn_max, 0)
        check_choice(cls.name, "knn_backend", knn_backend, BACKENDS)

    def attend(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kernel: nn.Module,
        step: MemoryStep,
        q_raw: Tensor,
        k_raw: Tensor,
    ) -> Tensor:
        y = super().attend(layer, q, k, v, kernel, step, q_raw, k_raw)
        if layer != self.layer:
            return y
        if getattr(kernel, "shared_qk", False):
            k_raw = q_raw  # the layer's keys are its queries (shared-QK kernels)
        old = step.old
        if "knn.k" in old:
            y = self._mix(y, q_raw, old["knn.k"], old["knn.v"], old["knn.valid"])
        self._write(step, k_raw.detach(), v.detach())
        return y

    def _mix(self, y: Tensor, q_raw: Tensor, keys: Tensor, values: Tensor, valid: Tensor) -> Tensor:
        has = valid.any(dim=1)  # (B,): rows with something to retrieve
        if not bool(has.any()):
            return y  # exactly y_local; skips the search
        y_mem = knn_attention(q_raw, keys, values, valid, self.topk, self.backend)
        g = torch.sigmoid(self.gate).to(y.dtype)[None, :, None, None]
        mixed = (g * y_mem.to(y.dtype) + (1 - g) * y).to(y.dtype)
        # Rows with an empty store keep y_local bit for bit, not y * (1 - g) + g * 0.
        return torch.where(has[:, None, None, None], mixed, y)

    def _write(self, step: MemoryStep, k_raw: Tensor, v: Tensor) -> None:
        old = step.old
        fresh = k_raw.new_ones(k_raw.shape[0], k_raw.shape[-2], dtype=torch.bool)
        if "knn.k" in old:
            keys = torch.cat((old["knn.k"], k_raw.to(old["knn.k"].dtype)), dim=-2)
            values = torch.cat((old["knn.v"], v.to(old["knn.v"].dtype)), dim=-2)
            valid = torch.cat((old["knn.valid"], fresh), dim=1)
        else:
            keys, values, valid = k_raw, v, fresh
        start = int(valid.any(dim=0).int().argmax())  # first column some row still holds
        if self.max:
            start = max(start, valid.shape[1] - self.max)
        step.new["knn.k"] = keys[..., start:, :]
        step.new["knn.v"] = values[..., start:, :]
        step.new["knn.valid"] = valid[:, start:]

    def reset(self, state: MemoryState, rows: Tensor) -> MemoryState:
        state = super().reset(state, rows)
        if "knn.valid" not in state:
            return state
        return {**state, "knn.valid": keep_rows(state["knn.valid"], rows)}
