"""KV caches for incremental decoding: one contract, several policies for what to keep.

Contract, shared by every cache policy: ``update(layer, k, v) -> (k_all, v_all)`` appends the new
keys/values (B, H, T, D) of one layer and returns everything that layer's T queries may attend to,
the queries being the last T of the returned keys; ``advance(t)`` is called once per forward after
all layers; ``seq_len`` is how many tokens have been read; ``nbytes()`` counts the bytes of the
tensors the cache holds (every policy allocates its buffers up front, so it never changes).

Optional, with the default a plain cache gets (``LongLM`` and ``SelfAttention`` use ``getattr``):

- ``mask(t) -> Tensor | None`` (None): after ``update``, the (T, T_keys) bool mask of this chunk's
  queries, True = may attend. None means plain causal, bottom-right aligned, which the model's
  kernel applies itself; a bounded policy returns a band when a chunk of T > 1 tokens reaches
  past its window (one token at a time never needs one). ``SelfAttention`` then runs SDPA with
  that mask instead of its kernel, so a kernel's own sparsity (sliding, lsh, block_sparse) does
  not apply to such a chunk.
- ``position(pos) -> int`` (``pos``): the rotary position of the next token after ``pos`` tokens.
- ``rotates_keys`` (False): ``update`` takes keys *before* rotary and returns them rotated at
  the cache's own positions.
- ``reads_queries`` (False): ``update(layer, k, v, queries=q)`` is also given the chunk's queries
  (B, H_q, T, D), rotated as its keys come in (before rotary when ``rotates_keys``), for a
  policy that chooses what to return by them (``retrieval``).
- ``unbounded`` (False): the cache reads input of any length, so the model checks only each
  chunk against ``max_seq_len``; a cache without it is held to ``max_seq_len`` in all.

Policies, by the name ``build_cache`` takes (``CACHES``). A policy is its options and checks
(a ``CachePolicy``): what each layer keeps is its ``layout()``, which ``allocate`` turns into
memext's cache for a model's shape and ``memext.hf.cache`` into a Hugging Face one, so both take
the same options. A new policy is a ``CachePolicy`` subclass with ``@register_cache("name")``
(in this module, or in its own module imported by ``memext/infer/__init__.py``, as
``retrieval`` is). The policies:

- ``full`` (``max_len``): every token, up to ``max_len``; refuses more.
- ``window`` (``window`` = w): the newest w - 1 tokens. Each query sees itself and the w - 1
  tokens before it, exactly masked full attention with ``reference.sliding_mask``'s band of
  width w, chunks included. Keys keep their absolute rotary positions.
- ``sinks`` (``sinks`` = s, ``window`` = w, ``rotary``): StreamingLLM. The first s tokens and the
  newest w - 1; each query sees the s sinks and the band of w tokens ending at itself. Rotary
  positions are positions *inside the cache*: keys are stored before rotary and rotated on read
  at 0, 1, ..., so the kept keys sit at consecutive positions after every eviction, and the next
  token's position is ``position(pos)`` = the number of tokens kept (at most s + w - 1). One
  token at a time this is StreamingLLM exactly; in a chunk of T tokens a query sits up to T - 1
  positions further from the sinks than it would decoding one token at a time.
- ``retrieval`` (``sinks``, ``window``, ``block``, ``topk``, ``reps``, ``store_device``,
  ``rotary``; module ``memext.infer.retrieval``): InfLLM-style memory. Sinks, a local window, and
  evicted tokens stored in blocks with representative keys; each chunk brings back the ``topk``
  blocks its queries match best, at cache positions. Bytes and positions: that module's doc.
- ``kivi`` (``max_len``, ``bits``, ``group``, ``residual``, ``value_group``, ``sinks``,
  ``scale_dtype``, ``outliers``, ``pre_rotary``, ``rotary``; module ``memext.infer.kivi``):
  every token, old ones in 2-bit codes (keys per channel over groups of tokens, values per
  token), the newest in a full-precision residual; optionally keys quantized before rotary,
  fp16 scales and exact outliers (KVQuant). Bytes: that module's doc.
- ``snapkv`` (``budget``, ``window``, ``kernel``, ``sinks``, ``pool``, ``max_len``; module
  ``memext.infer.snapkv``): the prompt in full; when it ends (the first one-token forward) its
  last queries vote which ``budget`` prompt tokens each KV head keeps. Bytes: that module's doc.
- ``quantized`` (``policy`` = full | window | sinks, their options, ``axis``, ``group`` = G):
  the same policies over int8 storage (``memext.infer.kv_store``), symmetric absmax, so every
  stored element is within scale / 2 of what was written. ``axis="token"``: one fp32 scale per
  token per head (over head_dim), keys and values. ``axis="channel"``: keys get one fp32 scale
  per channel per group of G tokens (KIVI: key outliers live in fixed channels), the newest,
  incomplete group in full precision until it fills; values per token. Sinks stay in full
  precision: they are few and draw a large share of the attention. The newest chunk attends to
  itself in full precision; it is stored quantized for later queries.

Bytes held, ``nbytes()`` (L layers, B batch, H heads, D head_dim, e = bytes per element of the
cache dtype, 4 for fp32, 2 for bf16; C = tokens the recent part keeps: ``max_len`` for policy
full, w - 1 for window and sinks):

- full: ``2·L·B·H·max_len·D·e``; window: ``2·L·B·H·(w-1)·D·e``; sinks: ``2·L·B·H·(s+w-1)·D·e``.
- quantized, axis token: ``L·B·H·2·C·(D + 4)``, i.e. 2·(D + 4) bytes per token per head per layer
  against 2·D·e unquantized (3.76x less than fp32 at D = 64).
- quantized, axis channel: ``L·B·H·(⌈C/G⌉·G·D + ⌈C/G⌉·4·D + (G-1)·D·e + C·(D + 4))``, i.e. per
  token D + 4·D/G (keys) + D + 4 (values), plus a fixed full-precision residual of G - 1 keys.
- quantized with policy sinks adds the full-precision sinks, ``2·L·B·H·s·D·e``.

Not counted: what one forward allocates and drops (the keys returned, dequantized copies), and
two small tables window/sinks keep between calls, the chunk's band mask (T·(s + w + T) bytes)
and the sinks' rotation table (2·(s + w - 1 + T)·D·4 bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from memext.infer.kv_store import ChannelGroups, FloatRing, Int8Ring
from memext.nn.rotary import apply_rotary
from memext.registry import Registry

Rotation = Callable[..., tuple[Tensor, Tensor]]


#: Heads per layer: one count for every layer, or one per layer (a model whose heads were pruned).
Heads = int | Sequence[int]


def layer_heads(n_heads: Heads, n_layers: int) -> list[int]:
    """``n_heads`` as one count per layer."""
    if isinstance(n_heads, int):
        return [n_heads] * n_layers
    if len(n_heads) != n_layers:
        raise ValueError(f"{len(n_heads)} head counts for {n_layers} layers")
    return list(n_heads)


@dataclass(frozen=True)
class Layout:
    """What one layer keeps: the first ``sinks`` tokens, then the newest ``window - 1`` (every
    token, up to ``max_len``, when ``window`` is None), in full precision or int8 by
    ``quantize`` ("token" or "channel", in groups of ``group`` tokens), or in the storage
    ``store(batch, n_heads, head_dim, capacity, dtype, device)`` makes (a policy with a store of
    its own, ``kivi``): an object with ``write``, ``read`` and ``nbytes`` as in
    ``memext.infer.kv_store``."""

    sinks: int = 0
    window: int | None = None
    max_len: int | None = None
    quantize: str | None = None
    group: int = 32
    store: Callable[..., Any] | None = None


class CachePolicy:
    """A KV-cache policy: its options (``__init__`` keywords, checked there) and what it keeps."""

    name: str

    @classmethod
    def covering(cls, tokens: int) -> dict[str, Any] | None:
        """Options under which this policy keeps every key and value of a ``tokens``-token
        sequence as written, so it computes what ``full`` computes (greedy decoding included);
        None for a policy that claims no such exactness (it approximates, as int8 storage)."""
        return None

    def layout(self) -> Layout:
        raise NotImplementedError

    def rotation(self) -> Rotation | None:
        """The model's rotary when the cache rotates keys itself (at cache positions)."""
        return None

    def allocate(
        self,
        n_layers: int,
        batch: int,
        n_heads: Heads,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Any:
        """memext's cache under this policy for a model of this shape, allocated up front."""
        lay = self.layout()
        layers = [
            make_kv_layer(batch, h, head_dim, lay, dtype, device)
            for h in layer_heads(n_heads, n_layers)
        ]
        return KeptCache(layers, lay.sinks, lay.window, lay.max_len, self.rotation(), device)


CACHES: Registry[type[CachePolicy]] = Registry("cache", noun="option")
register_cache = CACHES.register


def cache_options(name: str) -> tuple[str, ...]:
    """The keyword options the policy ``name`` takes."""
    return CACHES.takes(name)


def build_cache(
    name: str,
    n_layers: int,
    batch: int,
    n_heads: Heads,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **options: Any,
) -> Any:
    """The cache policy registered as ``name``, with ``options``, for a model of this shape."""
    policy = CACHES.build(name, **options)
    return policy.allocate(n_layers, batch, n_heads, head_dim, dtype, device)


def _check_positive(**values: int | None) -> None:
    for key, value in values.items():
        if value is None:
            raise ValueError(f"the cache needs {key}=N (a positive number of tokens)")
        if value < 1:
            raise ValueError(f"{key} must be a positive number of tokens, got {key}={value}")


def _check_fits(end: int, max_len: int) -> None:
    if end > max_len:
        raise ValueError(f"the KV cache holds {max_len} positions; {end} were asked for")


def _need_rotary(rotary: Rotation | None, who: str) -> Rotation:
    if rotary is None:
        raise ValueError(f"{who} rotates keys itself: pass rotary=model.rotary")
    return rotary


@register_cache("full")
class Full(CachePolicy):
    """Every key and value, up to ``max_len`` positions; more are refused."""

    def __init__(self, max_len: int | None = None) -> None:
        _check_positive(max_len=max_len)
        self.max_len = max_len

    @classmethod
    def covering(cls, tokens: int) -> dict[str, Any]:
        return {"max_len": tokens}

    def layout(self) -> Layout:
        return Layout(max_len=self.max_len)

    def allocate(
        self,
        n_layers: int,
        batch: int,
        n_heads: Heads,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> FullCache:
        return FullCache(n_layers, batch, n_heads, head_dim, self.max_len, dtype, device)


class FullCache:
    """Keeps every key and value, preallocated to ``max_len`` positions: one slice per read, no
    copy (a ``KeptCache`` of the same layout would concatenate its store on every call). One
    buffer a layer, since layers whose heads were pruned hold fewer heads."""

    unbounded = False

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: Heads,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shapes = [(batch, h, max_len, head_dim) for h in layer_heads(n_heads, n_layers)]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.max_len = max_len
        self.seq_len = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.seq_len + k.shape[-2]
        _check_fits(end, self.max_len)
        self.k[layer][:, :, self.seq_len : end] = k
        self.v[layer][:, :, self.seq_len : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.seq_len += t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def kept(pos: int, sinks: int, window: int | None) -> tuple[int, int]:
    """After ``pos`` tokens, a policy keeps tokens [0, n_sinks) and [recent_start, pos)."""
    n_sinks = min(pos, sinks)
    recent_start = sinks if window is None else max(sinks, pos - (window - 1))
    return n_sinks, min(recent_start, pos)


def band_mask(
    start: int, t: int, sinks: int, window: int | None, device: torch.device | None = None
) -> Tensor | None:
    """(t, T_keys) mask of a chunk of t tokens read after ``start``, over the keys ``KVLayer``
    returns (kept tokens, then the chunk): a query sees the sinks and the w tokens ending at
    itself. None when that is plain causal (nothing is cut), so the kernel's path is taken."""
    if window is None:
        return None
    n_sinks, recent_start = kept(start, sinks, window)
    # The oldest key a band can cut is the first non-sink one; the newest query is the last.
    if start + t - 1 - max(recent_start, sinks) < window:
        return None
    key_pos = torch.cat(
        (
            torch.arange(n_sinks, device=device),
            torch.arange(recent_start, start + t, device=device),
        )
    )
    query_pos = torch.arange(start, start + t, device=device)[:, None]
    return (key_pos <= query_pos) & ((query_pos - key_pos < window) | (key_pos < sinks))


class KVLayer:
    """One layer's kept tokens: the first ``sinks`` in ``sink_store``, then the newest
    ``window - 1`` (all of them when ``window`` is None) in ``recent``.

    ``step(start, k, v)`` returns the kept tokens followed by the new chunk (no rotation) and
    stores the chunk; the Hugging Face cache (``memext.hf.cache``) runs the same layers.
    """

    def __init__(
        self, recent: Any, sinks: int = 0, window: int | None = None, sink_store: Any = None
    ):
        self.recent, self.sinks, self.window, self.sink_store = recent, sinks, window, sink_store

    def step(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n_sinks, recent_start = kept(start, self.sinks, self.window)
        ks: list[Tensor] = []
        vs: list[Tensor] = []
        if n_sinks:
            ks, vs = self.sink_store.read(0, n_sinks)
        rk, rv = self.recent.read(recent_start, start)
        keys = torch.cat([*(p.to(k.dtype) for p in (*ks, *rk)), k], dim=-2)
        values = torch.cat([*(p.to(v.dtype) for p in (*vs, *rv)), v], dim=-2)
        end = start + k.shape[-2]
        if start < self.sinks:
            n = self.sinks - start
            self.sink_store.write(start, k[..., :n, :], v[..., :n, :])
        first = max(start, self.sinks)
        if end > first:
            self.recent.write(first, k[..., first - start :, :], v[..., first - start :, :])
        return keys, values

    def nbytes(self) -> int:
        sinks = self.sink_store.nbytes() if self.sink_store is not None else 0
        return self.recent.nbytes() + sinks


def make_kv_layer(
    batch: int,
    n_heads: int,
    head_dim: int,
    layout: Layout,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> KVLayer:
    """One layer's storage for ``layout``: ``sinks`` full-precision sink slots, then a recent
    part of ``window - 1`` tokens (``max_len`` when window is None), full precision or int8
    (``quantize`` = "token" or "channel", see ``memext.infer.kv_store``)."""
    sinks, window = layout.sinks, layout.window
    capacity = layout.max_len if window is None else window - 1
    shape = (batch, n_heads, head_dim, capacity)
    if layout.store is not None:
        recent: Any = layout.store(*shape, dtype, device)
    elif layout.quantize == "channel":
        recent = ChannelGroups(*shape, layout.group, dtype, device)
    elif layout.quantize == "token":
        recent = Int8Ring(*shape, dtype, device)
    else:
        recent = FloatRing(*shape, dtype, device)
    sink_store = FloatRing(batch, n_heads, head_dim, sinks, dtype, device) if sinks else None
    return KVLayer(recent, sinks, window, sink_store)


class KeptCache:
    """A ``KVLayer`` per model layer behind the cache contract: masks, positions, rotation."""

    def __init__(
        self,
        layers: list[KVLayer],
        sinks: int,
        window: int | None,
        max_len: int | None = None,
        rotary: Rotation | None = None,
        device: torch.device | str = "cpu",
    ):
        self.layers, self.sinks, self.window, self.max_len = layers, sinks, window, max_len
        self.rotary, self.device = rotary, torch.device(device)
        self.rotates_keys = rotary is not None
        self.unbounded = window is not None
        self.seq_len = 0
        self._mask: tuple[tuple[int, int], Tensor | None] | None = None
        self._rotation: tuple[int, torch.device, Tensor, Tensor] | None = None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.max_len is not None:
            _check_fits(self.seq_len + k.shape[-2], self.max_len)
        keys, values = self.layers[layer].step(self.seq_len, k, v)
        if self.rotary is not None:
            keys = apply_rotary(keys, *self._cos_sin(keys.shape[-2], keys.device))
        return keys, values

    def _cos_sin(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        # Every layer of a call (and every decode step once full) rotates the same n positions.
        if self._rotation is None or self._rotation[:2] != (n, device):
            cos, sin = self.rotary(torch.arange(n, device=device), seq_len=n)
            self._rotation = (n, device, cos, sin)
        return self._rotation[2], self._rotation[3]

    def mask(self, t: int) -> Tensor | None:
        key = (self.seq_len, t)
        if self._mask is None or self._mask[0] != key:
            self._mask = (key, band_mask(self.seq_len, t, self.sinks, self.window, self.device))
        return self._mask[1]

    def position(self, pos: int) -> int:
        if not self.rotates_keys:
            return pos
        n_sinks, recent_start = kept(pos, self.sinks, self.window)
        return n_sinks + pos - recent_start

    def advance(self, t: int) -> None:
        self.seq_len += t

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


@register_cache("window")
class Window(CachePolicy):
    """The newest ``window - 1`` tokens: each query sees itself and the ``window - 1`` before it."""

    def __init__(self, window: int | None = None) -> None:
        _check_positive(window=window)
        self.window = window

    @classmethod
    def covering(cls, tokens: int) -> dict[str, Any]:
        return {"window": tokens}  # the newest tokens - 1 and the query itself: all of them

    def layout(self) -> Layout:
        return Layout(window=self.window)


@register_cache("sinks")
class Sinks(CachePolicy):
    """StreamingLLM: the first ``sinks`` tokens and the newest ``window - 1``, at cache positions.

    ``rotary`` is the model's ``Rotary`` (called as ``rotary(positions, seq_len=n)``); memext's
    cache needs it, a Hugging Face one re-rotates by the model config instead.
    """

    def __init__(
        self, sinks: int | None = None, window: int | None = None, rotary: Rotation | None = None
    ) -> None:
        _check_positive(sinks=sinks, window=window)
        self.sinks, self.window, self.rotary = sinks, window, rotary

    @classmethod
    def covering(cls, tokens: int) -> dict[str, Any]:
        return {"sinks": 4, "window": tokens}  # the band alone reaches back to token 0

    def layout(self) -> Layout:
        return Layout(sinks=self.sinks, window=self.window)

    def rotation(self) -> Rotation:
        return _need_rotary(self.rotary, "the sinks cache")


@register_cache("quantized")
class Quantized(CachePolicy):
    """The ``full``, ``window`` or ``sinks`` policy over int8 storage (see the module doc).

    The sizes and ``rotary`` go to that policy, which ignores those it does not use
    (``max_len`` for window...), so one set of options can build any of them.
    """

    def __init__(
        self,
        policy: str = "full",
        max_len: int | None = None,
        window: int | None = None,
        sinks: int | None = None,
        axis: str = "token",
        group: int = 32,
        rotary: Rotation | None = None,
    ) -> None:
        if policy not in ("full", "window", "sinks"):
            raise ValueError(f"policy must be full, window or sinks, got {policy!r}")
        sizes = {"max_len": max_len, "window": window, "sinks": sinks, "rotary": rotary}
        self.inner: CachePolicy = CACHES.build(policy, sizes)
        if axis not in ("token", "channel"):
            raise ValueError(f"quantized axis must be 'token' or 'channel', got {axis!r}")
        _check_positive(group=group)
        self.policy, self.axis, self.group = policy, axis, group

    def layout(self) -> Layout:
        return replace(self.inner.layout(), quantize=self.axis, group=self.group)

    def rotation(self) -> Rotation | None:
        return self.inner.rotation()
