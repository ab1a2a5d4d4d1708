"""The ``kivi`` KV-cache policy: 2-bit keys per channel, values per token, a full-precision
residual of the newest tokens (KIVI, Liu et al. 2024).

Every token up to ``max_len`` is kept, as in ``full``; what changes is how. With s = ``sinks``
(4 by default), G = ``group``, R = ``residual`` and b = ``bits``:

- The first s tokens stay in full precision: StreamingLLM's attention sinks, which draw much of
  the attention. KIVI itself has none; on SmolLM2 over 1,024 tokens of text (chunk 128) the
  perplexity change at 2 bits was +30% with s = 0 and +7.9% with s = 4 (``sinks=0`` gives
  KIVI as published).
- The newest tokens stay in full precision, between R - G + 1 and R of them: quantization works
  on whole groups of G tokens (counted from token s), and a group is quantized as soon as the
  full-precision part would otherwise pass R tokens. So R >= G - 1, the most tokens an
  incomplete group can hold.
- Older tokens are quantized to b bits, asymmetric (a scale and a zero point, fp32):
  ``scale = (max - min) / (2^b - 1)``, ``q = round((x - min) / scale)`` in [0, 2^b - 1],
  ``x^ = min + q·scale``, so ``|x - x^| <= scale / 2`` element by element (up to the fp32
  rounding of that arithmetic, a few ulps of the group's largest magnitude). Keys take one
  (scale, zero) per channel per group of G tokens, because key outliers sit in fixed channels;
  values one per token per group of ``value_group`` channels (all of head_dim by default), as
  the attention output mixes values token by token.
- Codes are packed 8/b to a byte along head_dim (4 per byte at 2 bits), the first in the low
  bits.

Three options go past KIVI (all off by default, which is KIVI as above), after KVQuant (Hooper
et al. 2024) and KIVI's own code:

- ``pre_rotary``: keys are quantized *before* rotary, as KVQuant does. Rotary turns each pair
  of channels by an angle that grows with the position, so within a group of G tokens a
  channel's values sweep a wider range after rotation than before. The cache then rotates keys
  itself on read, at their true positions (every token is kept, so cache positions are the
  true ones): memext's models pass ``rotary``, transformers' keys are un-rotated with its own
  angles (``memext.hf.cache``).
- ``scale_dtype="float16"``: scales and zero points in fp16 (f = 2 bytes instead of 4), as
  KIVI's code keeps them. The zero is rounded down and the scale up, so the stored grid still
  covers [min, max] and the bound holds with the stored numbers; a range fp16 cannot hold is
  refused.
- ``outliers`` = o: KVQuant's dense-and-sparse split. In every quantized group (G tokens ×
  head_dim, keys and values alike) the k = ⌈o·G·D⌉ entries farthest from the median of their
  slice (a key's channel over the group, a value group within a token: what quantization
  reduces over) are kept in the cache dtype with int16 positions, and the slice's range is
  taken without them; on read they are put back exactly.

As in ``quantized``, the chunk a forward reads attends to itself in full precision and is stored
quantized (when old enough) for later queries; one token at a time (decoding) it is KIVI
exactly. With R >= ``max_len`` - s nothing is ever quantized and the policy computes what
``full`` computes.

Bytes held, ``nbytes()`` (all allocated up front; L layers, B batch, H KV heads, D head_dim, e
bytes per element of the cache dtype, M = ``max_len``, c = ⌈D·b/8⌉ bytes of codes per token,
m = D / ``value_group`` value groups per token, n = ⌈max(M - s - R, 0) / G⌉ quantized groups,
f = 4 or 2 bytes a scale (``scale_dtype``), k = ⌈o·G·D⌉ outliers a group):

    L·B·H·( 2·s·D·e                       sinks
          + n·G·c + n·2·f·D               keys: codes, scale and zero per channel per group
          + n·G·c + n·G·2·f·m             values: codes, scale and zero per token per group
          + 2·n·k·(e + 2)                 outliers of keys and values: value and int16 position
          + 2·min(R, M - s)·D·e )         the full-precision residual, keys and values

Per quantized token per head per layer that is 2·c + 2·f·D/G + 2·f·m + 2·k·(e + 2)/G bytes
against 2·D·4 in fp32: at D = 64, b = 2, G = 32, m = 1, f = 4, 56 bytes against 512 (0.109);
the residual adds R·2·D·e once. At M = 4096, s = 4, R = 128: 289,792 bytes against 2,097,152,
**0.138× fp32** per head per layer (SmolLM2's head_dim is 64); at M = 2048 0.167×, at 16k
0.117×. With ``pre_rotary``, ``scale_dtype="float16"``, ``value_group=32``, ``outliers=0.025``
and R = 64 (k = 52; 67.5 bytes a token): **0.146× fp32** at M = 4096, where SmolLM2's
perplexity change on text falls from +15.5% to +4.3% (docs/results.md#kv-compression).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from memext.infer.cache import (
    CachePolicy,
    Layout,
    Rotation,
    _check_positive,
    _need_rotary,
    register_cache,
)
from memext.infer.kv_store import Pieces

#: Bit widths whose codes pack whole into a byte.
BITS = (1, 2, 4, 8)
#: The default group of tokens a key scale covers (KIVI's).
GROUP = 32


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (..., n), each < 2^bits -> (..., ⌈n·bits/8⌉) bytes, 8/bits codes a byte, the
    first code in the low bits (the last byte zero-padded)."""
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.reshape(*codes.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """``pack_codes``'s inverse: (..., ⌈n·bits/8⌉) bytes -> uint8 codes (..., n)."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (..., bytes, 8/bits)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def quantize_asym(
    x: Tensor,
    dim: int,
    bits: int,
    exclude: Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """x -> (uint8 codes in [0, 2^bits - 1], scale, zero) reduced over ``dim``, with
    x ≈ zero + codes·scale within scale / 2.

    ``exclude`` (bool, x's shape): elements left out of the range (outliers kept elsewhere);
    their codes are clamped into it. ``scale_dtype`` float16 stores scale and zero in fp16, the
    zero rounded down and the scale up, so the stored grid still covers [min, max] and the
    bound holds with the stored numbers."""
    xf = x.float()
    if exclude is None:
        lo, hi = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    else:
        inf = torch.tensor(float("inf"), device=x.device)
        lo = torch.where(exclude, inf, xf).amin(dim=dim, keepdim=True)
        hi = torch.where(exclude, -inf, xf).amax(dim=dim, keepdim=True)
        empty = lo.isinf()  # a slice of outliers only: any grid will do
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    top = (1 << bits) - 1
    if scale_dtype == torch.float32:
        scale, zero = (hi - lo) / top, lo
        stored_scale, stored_zero = scale, zero
    else:
        stored_zero = lo.to(scale_dtype)
        down = torch.nextafter(stored_zero, torch.full_like(stored_zero, float("-inf")))
        stored_zero = torch.where(stored_zero.float() > lo, down, stored_zero)
        zero = stored_zero.float()
        stored_scale = ((hi - zero) / top).to(scale_dtype)
        up = torch.nextafter(stored_scale, torch.full_like(stored_scale, float("inf")))
        stored_scale = torch.where(zero + stored_scale.float() * top < hi, up, stored_scale)
        if not (stored_scale.isfinite().all() and stored_zero.isfinite().all()):
            raise ValueError(
                f"kivi scale_dtype={str(scale_dtype).removeprefix('torch.')} cannot hold this "
                "cache's range (|x| up to "
                f"{float(xf.abs().max()):.4g}): use scale_dtype='float32'"
            )
        scale = stored_scale.float()
    # A constant slice has scale 0: its codes are 0 and it comes back exactly (zero = x).
    codes = torch.round((xf - zero) / scale.clamp_min(torch.finfo(torch.float32).tiny))
    return codes.clamp_(0, top).to(torch.uint8), stored_scale, stored_zero


def dequantize_asym(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def top_outliers(x: Tensor, dim: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` entries of each block x (b, h, n, ...) farthest from the median of their slice
    along ``dim`` (the slices quantization reduces over, so these are what widen a slice's
    range): their positions in the flattened block (int16), their values, and a bool mask of
    them (x's shape)."""
    far = (x - x.median(dim=dim, keepdim=True).values).abs()
    idx = far.flatten(3).topk(k, dim=-1).indices
    mask = torch.zeros_like(far, dtype=torch.bool).flatten(3).scatter_(-1, idx, True)
    return idx.to(torch.int16), x.flatten(3).gather(-1, idx), mask.view(x.shape)


class KiviStore:
    """One layer's tokens [origin, origin + capacity) under KIVI (see the module doc): whole
    groups of ``group`` tokens quantized, the newest tokens in a full-precision residual.

    A store of ``memext.infer.kv_store``'s kind, used as a ``KVLayer``'s recent part: tokens come
    in order (``write(start, k, v)`` continues where the last write ended) and ``read(start,
    end)`` is asked for tokens up to the end of the last write.
    """

    def __init__(
        self,
        batch: int,
        n_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        origin: int = 0,
        bits: int = 2,
        group: int = GROUP,
        residual: int = 128,
        value_group: int | None = None,
        scale_dtype: torch.dtype = torch.float32,
        outliers: float = 0.0,
    ):
        value_group = value_group or head_dim
        if head_dim % value_group:
            raise ValueError(
                f"kivi value_group={value_group} must divide head_dim={head_dim}: values take "
                "one scale and zero per group of that many channels"
            )
        self.origin = origin  # tokens [origin, capacity): the sinks are held elsewhere
        self.capacity = max(capacity - origin, 0)
        self.bits, self.group, self.residual, self.value_group = bits, group, residual, value_group
        self.dtype, self.head_dim, self.scale_dtype = dtype, head_dim, scale_dtype
        self.n_groups = math.ceil(max(self.capacity - residual, 0) / group)
        code_bytes = math.ceil(head_dim * bits / 8)
        n_tokens = self.n_groups * group
        # Outliers per block of group x head_dim entries (keys and values alike), at int16 positions.
        self.n_outliers = math.ceil(outliers * group * head_dim)
        if self.n_outliers and group * head_dim > 2**15:
            raise ValueError(
                f"kivi outliers are placed by int16 positions within a block of group x head_dim "
                f"= {group * head_dim} entries: keep it <= 32768 (a smaller group)"
            )

        def zeros(*shape: int, dt: torch.dtype = scale_dtype) -> Tensor:
            return torch.zeros((batch, n_heads, *shape), dtype=dt, device=device)

        self.key_codes = zeros(self.n_groups, group, code_bytes, dt=torch.uint8)
        self.key_scale, self.key_zero = (zeros(self.n_groups, 1, head_dim) for _ in range(2))
        self.value_codes = zeros(n_tokens, code_bytes, dt=torch.uint8)
        m = head_dim // value_group
        self.value_scale, self.value_zero = (zeros(n_tokens, m, 1) for _ in range(2))
        k = self.n_outliers
        self.key_out, self.value_out = (zeros(self.n_groups, k, dt=dtype) for _ in range(2))
        self.key_out_at, self.value_out_at = (
            zeros(self.n_groups, k, dt=torch.int16) for _ in range(2)
        )
        held = min(residual, self.capacity)
        self.res_k, self.res_v = zeros(held, head_dim, dt=dtype), zeros(held, head_dim, dt=dtype)
        self.end = origin  # the token after the last one written

    def boundary(self, pos: int) -> int:
        """With ``pos`` tokens read, tokens [origin, boundary) are quantized, the rest not."""
        over = max(pos - self.origin - self.residual, 0)
        return self.origin + math.ceil(over / self.group) * self.group

    def write(self, start: int, k: Tensor, v: Tensor) -> None:
        t = k.shape[-2]
        if start != self.end:
            raise ValueError(
                f"the kivi store appends tokens in order: expected token {self.end}, got {start}"
            )
        end = start + t
        if end - self.origin > self.capacity:
            raise ValueError(
                f"the KV cache holds {self.origin + self.capacity} positions; {end} were asked for"
            )
        q0, q1 = self.boundary(start), self.boundary(end)
        if q1 == q0:  # no group fills: the chunk joins the residual
            self.res_k[..., start - q0 : end - q0, :] = k
            self.res_v[..., start - q0 : end - q0, :] = v
            self.end = end
            return
        # Tokens [q0, end): the residual, then the chunk; [q0, q1) are quantized now.
        cand_k = torch.cat((self.res_k[..., : start - q0, :], k.to(self.dtype)), dim=-2)
        cand_v = torch.cat((self.res_v[..., : start - q0, :], v.to(self.dtype)), dim=-2)
        self._quantize(q0, cand_k[..., : q1 - q0, :], cand_v[..., : q1 - q0, :])
        self.res_k[..., : end - q1, :] = cand_k[..., q1 - q0 :, :]
        self.res_v[..., : end - q1, :] = cand_v[..., q1 - q0 :, :]
        self.end = end

    def _quantize(self, first: int, k: Tensor, v: Tensor) -> None:
        """Store tokens [first, first + n·group), whole groups, quantized."""
        b, h, n_tok, d = k.shape
        n, g0 = n_tok // self.group, (first - self.origin) // self.group
        keys = k.reshape(b, h, n, self.group, d)  # per channel over the group's tokens
        values = v.reshape(b, h, n_tok, d // self.value_group, self.value_group)  # per token
        key_out = value_out = None
        if self.n_outliers:
            at, out, key_out = top_outliers(keys, 3, self.n_outliers)
            self.key_out_at[:, :, g0 : g0 + n], self.key_out[:, :, g0 : g0 + n] = at, out
            at, out, value_out = top_outliers(values.view(b, h, n, -1, self.value_group), -1,
                                              self.n_outliers)  # fmt: skip
            self.value_out_at[:, :, g0 : g0 + n], self.value_out[:, :, g0 : g0 + n] = at, out
            value_out = value_out.view(values.shape)
        codes, scale, zero = quantize_asym(keys, 3, self.bits, key_out, self.scale_dtype)
        self.key_codes[:, :, g0 : g0 + n] = pack_codes(codes, self.bits)
        self.key_scale[:, :, g0 : g0 + n] = scale
        self.key_zero[:, :, g0 : g0 + n] = zero
        a = first - self.origin
        codes, scale, zero = quantize_asym(values, -1, self.bits, value_out, self.scale_dtype)
        self.value_codes[:, :, a : a + n_tok] = pack_codes(codes.reshape(b, h, n_tok, d), self.bits)
        self.value_scale[:, :, a : a + n_tok] = scale
        self.value_zero[:, :, a : a + n_tok] = zero

    def _restore(self, x: Tensor, at: Tensor, out: Tensor) -> Tensor:
        """Groups x (B, H, g, group, D) with their outliers (positions ``at``) put back."""
        if not self.n_outliers:
            return x
        flat = x.flatten(3).scatter(-1, at.long(), out.to(x.dtype))
        return flat.view(x.shape)

    def read(self, start: int, end: int) -> Pieces:
        """Tokens [start, end), ``end`` the end of the last write: dequantized, then residual."""
        if end <= start:
            return [], []
        if end != self.end:
            raise ValueError(f"the kivi store holds tokens up to {self.end}, not {end}")
        q = self.boundary(end)
        ks: list[Tensor] = []
        vs: list[Tensor] = []
        if start < q:
            g0, g1 = (start - self.origin) // self.group, (q - self.origin) // self.group
            b, h, d, g = *self.key_codes.shape[:2], self.head_dim, self.group
            codes = unpack_codes(self.key_codes[:, :, g0:g1], self.bits, d)
            keys = dequantize_asym(
                codes, self.key_scale[:, :, g0:g1], self.key_zero[:, :, g0:g1], self.dtype
            )
            keys = self._restore(keys, self.key_out_at[:, :, g0:g1], self.key_out[:, :, g0:g1])
            a, z = g0 * g, g1 * g  # whole groups, cut to ``start`` below
            codes = unpack_codes(self.value_codes[:, :, a:z], self.bits, d)
            codes = codes.reshape(b, h, z - a, d // self.value_group, self.value_group)
            values = dequantize_asym(
                codes, self.value_scale[:, :, a:z], self.value_zero[:, :, a:z], self.dtype
            ).reshape(b, h, g1 - g0, g, d)
            values = self._restore(
                values, self.value_out_at[:, :, g0:g1], self.value_out[:, :, g0:g1]
            )
            skip = start - self.origin - a
            ks.append(keys.flatten(2, 3)[..., skip:, :])
            vs.append(values.flatten(2, 3)[..., skip:, :])
        lo = max(start, q)
        ks.append(self.res_k[..., lo - q : end - q, :])
        vs.append(self.res_v[..., lo - q : end - q, :])
        return ks, vs

    def nbytes(self) -> int:
        held = (self.key_codes, self.key_scale, self.key_zero, self.value_codes)
        held += (self.value_scale, self.value_zero, self.res_k, self.res_v)
        held += (self.key_out, self.key_out_at, self.value_out, self.value_out_at)
        return sum(x.numel() * x.element_size() for x in held)


#: ``scale_dtype`` names and the dtypes scales and zero points are stored in.
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@register_cache("kivi")
class Kivi(CachePolicy):
    """Every token up to ``max_len``, old ones in ``bits``-bit codes (see the module doc)."""

    def __init__(
        self,
        max_len: int | None = None,
        bits: int = 2,
        group: int = GROUP,
        residual: int = 128,
        value_group: int | None = None,
        sinks: int = 4,
        scale_dtype: str = "float32",
        outliers: float = 0.0,
        pre_rotary: bool = False,
        rotary: Rotation | None = None,
    ) -> None:
        _check_positive(max_len=max_len, group=group)
        if bits not in BITS:
            raise ValueError(
                f"kivi bits must be one of {', '.join(map(str, BITS))} (codes packed 8/bits to a "
                f"byte), got bits={bits}"
            )
        if not isinstance(residual, int) or residual < group - 1:
            raise ValueError(
                f"kivi residual={residual} must hold the newest, incomplete group: choose "
                f"residual >= group - 1 = {group - 1}"
            )
        if value_group is not None:
            _check_positive(value_group=value_group)
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"kivi sinks must be a number of tokens >= 0, got sinks={sinks!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"kivi scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}"
            )
        if not (isinstance(outliers, (int, float)) and 0 <= outliers < 1):
            raise ValueError(
                f"kivi outliers is the fraction of each block kept exact, in [0, 1), got "
                f"outliers={outliers!r}"
            )
        if not isinstance(pre_rotary, bool):
            raise ValueError(f"kivi pre_rotary must be true or false, got {pre_rotary!r}")
        self.max_len, self.bits, self.group, self.residual = max_len, bits, group, residual
        self.value_group, self.sinks = value_group, sinks
        self.scale_dtype, self.outliers = scale_dtype, float(outliers)
        self.pre_rotary, self.rotary = pre_rotary, rotary

    @classmethod
    def covering(cls, tokens: int) -> dict[str, Any]:
        return {"residual": max(tokens, GROUP - 1)}  # nothing is ever quantized

    def layout(self) -> Layout:
        store = functools.partial(
            KiviStore,
            origin=self.sinks,
            bits=self.bits,
            group=self.group,
            residual=self.residual,
            value_group=self.value_group,
            scale_dtype=SCALE_DTYPES[self.scale_dtype],
            outliers=self.outliers,
        )
        return Layout(sinks=self.sinks, max_len=self.max_len, store=store)

    def rotation(self) -> Rotation | None:
        # Keys before rotary are quantized; every token is kept, so cache positions are the
        # true ones and rotating on read gives each key its own angle back.
        return _need_rotary(self.rotary, "kivi with pre_rotary") if self.pre_rotary else None
