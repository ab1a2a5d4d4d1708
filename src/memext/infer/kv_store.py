"""Where one layer's kept keys and values live: full-precision or int8 token stores.

A store holds tokens of one layer by their *absolute index* in the stream (0, 1, 2, ... in the
order they were read). ``write(start, k, v)`` hands it tokens ``start .. start + T - 1`` (it keeps
the ones it has room for, the newest); ``read(start, end)`` returns tokens ``start .. end - 1`` in
that order, as lists of pieces so the caller concatenates everything with one copy. All buffers
are allocated up front, so a store's ``nbytes()`` never changes.

- ``FloatRing``: the newest ``capacity`` tokens as they came; token a sits in slot a % capacity.
- ``Int8Ring``: the same ring in int8, one fp32 scale per token per head (absmax over head_dim).
- ``ChannelGroups``: keys in int8 with one fp32 scale per channel per group of ``group`` tokens
  (KIVI's key layout), the newest, incomplete group in full precision until it fills; values as
  in ``Int8Ring``.

Every int8 code here is symmetric absmax: ``scale = max|x| / 127``, ``q = round(x / scale)``, so
``|q * scale - x| <= scale / 2`` element by element (up to fp32 rounding of the division).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Pieces = tuple[list[Tensor], list[Tensor]]


def quantize_int8(x: Tensor, dim: int | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """x -> (int8 codes, fp32 scales reduced over ``dim``) with x ≈ codes * scales."""
    xf = x.float()
    scale = xf.abs().amax(dim=dim, keepdim=True) / 127.0
    # An all-zero slice has scale 0; dividing by the smallest normal keeps its codes 0, not NaN.
    codes = torch.round(xf / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-127, 127)
    return codes.to(torch.int8), scale


def dequantize_int8(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (codes.float() * scale).to(dtype)


def ring_spans(start: int, end: int, capacity: int) -> list[tuple[int, int]]:
    """Slot ranges holding absolute tokens [start, end) of a ring (at most two: it may wrap)."""
    n = end - start
    if n <= 0:
        return []
    if n > capacity:
        raise ValueError(f"a ring of {capacity} slots cannot return {n} tokens")
    a = start % capacity
    if a + n <= capacity:
        return [(a, a + n)]
    return [(a, capacity), (0, a + n - capacity)]


def _slots(first: int, n: int, capacity: int, device: torch.device) -> Tensor:
    return torch.arange(first, first + n, device=device) % capacity


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class FloatRing:
    """The newest ``capacity`` tokens of one layer, unchanged (B, H, capacity, D) per k and v."""

    def __init__(
        self,
        batch: int,
        n_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch, n_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity

    def write(self, start: int, k: Tensor, v: Tensor) -> None:
        m = min(k.shape[-2], self.capacity)
        if m == 0:
            return
        slots = _slots(start + k.shape[-2] - m, m, self.capacity, self.k.device)
        self.k.index_copy_(2, slots, k[..., -m:, :].to(self.k.dtype))
        self.v.index_copy_(2, slots, v[..., -m:, :].to(self.v.dtype))

    def read(self, start: int, end: int) -> Pieces:
        spans = ring_spans(start, end, self.capacity)
        return [self.k[..., a:b, :] for a, b in spans], [self.v[..., a:b, :] for a, b in spans]

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)


class _Int8Tokens:
    """One ring of int8 token vectors with one fp32 scale each (absmax over head_dim)."""

    def __init__(
        self,
        batch: int,
        n_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.codes = torch.zeros(
            (batch, n_heads, capacity, head_dim), dtype=torch.int8, device=device
        )
        self.scales = torch.zeros((batch, n_heads, capacity, 1), dtype=torch.float32, device=device)
        self.capacity, self.dtype = capacity, dtype

    def write(self, start: int, x: Tensor) -> None:
        m = min(x.shape[-2], self.capacity)
        if m == 0:
            return
        slots = _slots(start + x.shape[-2] - m, m, self.capacity, self.codes.device)
        codes, scales = quantize_int8(x[..., -m:, :], dim=-1)
        self.codes.index_copy_(2, slots, codes)
        self.scales.index_copy_(2, slots, scales)

    def read(self, start: int, end: int) -> list[Tensor]:
        return [
            dequantize_int8(self.codes[..., a:b, :], self.scales[..., a:b, :], self.dtype)
            for a, b in ring_spans(start, end, self.capacity)
        ]

    def nbytes(self) -> int:
        return _nbytes(self.codes, self.scales)


class Int8Ring:
    """``FloatRing`` in int8: one fp32 scale per token per head, over head_dim."""

    def __init__(
        self,
        batch: int,
        n_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.k = _Int8Tokens(batch, n_heads, head_dim, capacity, dtype, device)
        self.v = _Int8Tokens(batch, n_heads, head_dim, capacity, dtype, device)
        self.capacity = capacity

    def write(self, start: int, k: Tensor, v: Tensor) -> None:
        self.k.write(start, k)
        self.v.write(start, v)

    def read(self, start: int, end: int) -> Pieces:
        return self.k.read(start, end), self.v.read(start, end)

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


class ChannelGroups:
    """Keys per channel over groups of ``group`` tokens (KIVI), values per token; int8.

    Token a belongs to group a // group. A group is quantized when its last token arrives, with
    one scale per channel (absmax over its tokens), because key outliers sit in fixed channels;
    until then its tokens wait in a full-precision residual of ``group - 1`` slots. Whole groups
    are kept in a ring of ``ceil(capacity / group)`` slots: enough to cover the newest
    ``capacity`` tokens, so up to ``group - 1`` tokens older than that are held too (and never
    returned). Values are int8 per token, in a ring of ``capacity`` tokens.
    """

    def __init__(
        self,
        batch: int,
        n_heads: int,
        head_dim: int,
        capacity: int,
        group: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.capacity, self.group, self.dtype = capacity, group, dtype
        self.n_groups = math.ceil(capacity / group)
        self.qk = torch.zeros(
            (batch, n_heads, self.n_groups, group, head_dim), dtype=torch.int8, device=device
        )
        self.sk = torch.zeros(
            (batch, n_heads, self.n_groups, 1, head_dim), dtype=torch.float32, device=device
        )
        self.residual = torch.zeros(
            (batch, n_heads, group - 1, head_dim), dtype=dtype, device=device
        )
        self.values = _Int8Tokens(batch, n_heads, head_dim, capacity, dtype, device)

    def write(self, start: int, k: Tensor, v: Tensor) -> None:
        g, end = self.group, start + k.shape[-2]
        self.values.write(start, v)
        # Groups this write completes and that still overlap the newest `capacity` tokens.
        first = max(start // g, max(end - self.capacity, 0) // g)
        last = end // g  # exclusive: group `last` is incomplete
        if last > first:
            # The first completed group may have begun before `start`: its head is in the residual.
            head = self.residual[..., : max(start - first * g, 0), :].to(k.dtype)
            tokens = torch.cat((head, k[..., max(first * g - start, 0) : last * g - start, :]), -2)
            b, h, _, d = tokens.shape
            q, s = quantize_int8(tokens.reshape(b, h, last - first, g, d), dim=3)
            slots = _slots(first, last - first, self.n_groups, self.qk.device)
            self.qk.index_copy_(2, slots, q)
            self.sk.index_copy_(2, slots, s)
        # The incomplete newest group, tokens [last * g, end), stays in full precision.
        if end > last * g:
            lo = max(last * g, start)
            self.residual[..., lo - last * g : end - last * g, :] = k[..., lo - start :, :]

    def read(self, start: int, end: int) -> Pieces:
        """Tokens [start, end), where ``end`` is the end of the last write."""
        g = self.group
        done = (end // g) * g  # tokens before this are in quantized groups
        ks: list[Tensor] = []
        if start < done:
            first, last = start // g, done // g
            slots = _slots(first, last - first, self.n_groups, self.qk.device)
            codes, scales = self.qk.index_select(2, slots), self.sk.index_select(2, slots)
            b, h, n, _, d = codes.shape
            keys = dequantize_int8(codes, scales, self.dtype).reshape(b, h, n * g, d)
            ks.append(keys[..., start - first * g : done - first * g, :])
        if end > max(start, done):
            lo = max(start, done)
            ks.append(self.residual[..., lo - done : end - done, :])
        return ks, self.values.read(start, end)

    def nbytes(self) -> int:
        return _nbytes(self.qk, self.sk, self.residual) + self.values.nbytes()
