"""memext's KV-cache policies (``memext.infer.cache.CACHES``) as a Hugging Face ``transformers.Cache``.

``PolicyCache(config, "window", window=512)`` gives every decoder layer a ``PolicyLayer`` that
runs the same ``memext.infer.cache.KVLayer`` (and storage) as ``memext.infer.cache``; pass it to
``model.generate(..., past_key_values=cache)`` or to a forward. The options and their checks are
the policy's own, and so is what each layer keeps (its ``layout()``); a policy's ``rotary``
option is memext's alone (see Positions). Needs transformers >= 5 (the layer-based ``Cache``);
one sequence per batch row, no padding.

Positions. Hugging Face rotates keys before the cache sees them, at the positions the model was
given (generate: 0, 1, 2, ...). ``window`` keeps that rotation: exactly ours. ``sinks``: RoPE
scores depend only on query - key distance, and StreamingLLM places the sinks right before the
kept window; so on read the sink keys are rotated on by the number of evicted tokens (rotations
compose: a key rotated to j and then by d is the key rotated to j + d), which gives every score
the distance our sinks cache gives with positions inside the cache. Query positions still grow
with the stream here (fp32 angles lose precision somewhere past a million tokens; ours stay
bounded), and the rope type must have fixed frequencies (not ``dynamic``/``longrope``).

Masks. Hugging Face builds the attention mask from the model config, not from the cache.
``get_mask_sizes`` tells it how many keys come back and places them contiguously before the
queries, so the causal mask is right, but a band cannot be expressed that way: a forward of
T > 1 tokens (generate's prompt) attends causally to the whole chunk plus what the cache kept,
and only then is the cache cut to its window. One token at a time (decoding) the band never
cuts anything, so decoding is exact. ``prefill`` reads a prompt in chunks with the band passed
as an explicit 4D mask, for the exact policy over a long prompt.

Retrieval (``memext.infer.retrieval``). The policy chooses blocks by the chunk's queries, which a
``Cache`` is never given: ``PolicyCache.attach(model)`` hooks every attention's query projection
(``q_proj``, or ``q_norm`` where the model has one) so each layer's ``update`` finds its queries
(``prefill`` attaches by itself). Keys come in rotated at their true positions; the layer
un-rotates them (the same fp32 angles transformers used, so the round trip is exact to rounding),
keeps them before rotary as memext's cache does, and rotates what it returns so that the
chunk's keys sit at their true positions and everything before them contiguously right before
(sinks, retrieved blocks, local part): every query-key distance is the one memext's cache gives
at cache positions. The mask is plain causal over the keys returned (no band), so
``model.generate`` over a long prompt reads what a chunked ``prefill`` reads.

``kivi`` is a layout with a store of its own (``memext.infer.kivi``) and runs in ``PolicyLayer``
like ``quantized``; with ``pre_rotary`` the layer un-rotates keys as retrieval's does, the store
quantizes them before rotary, and what it returns is rotated back at the true positions (kivi
keeps every token, so cache positions are the true ones). ``snapkv`` (``memext.infer.snapkv``)
reads queries too, so it needs ``attach`` as retrieval does; its keys stay at their true
positions, so only the queries are rotated (at their positions, with transformers' angles) for
the prompt's vote, and ``get_mask_sizes`` tells transformers, before the first decoded token,
how many keys the cut prompt leaves.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from memext.hf.model import cache_kwargs
from memext.infer.cache import CACHES, KVLayer, Layout, band_mask, kept, make_kv_layer
from memext.infer.prefill import prompt_tail, spans
from memext.infer.retrieval import Retrieval, RetrievalLayer, Rotations
from memext.infer.snapkv import SnapKV, SnapLayer
from memext.nn.rotary import apply_rotary

# Rope types whose frequencies change with the sequence length: a fixed re-rotation is wrong.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _rope(config: Any) -> tuple[dict[str, Any], str]:
    """A Hugging Face config's rope parameters and type ("default" when it names none)."""
    params = getattr(config, "rope_parameters", None) or {}
    return params, params.get("rope_type", "default")


def _inv_freq(config: Any) -> Tensor:
    """The rotary inverse frequencies of a Hugging Face config (fixed-frequency rope types)."""
    params, rope_type = _rope(config)
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        raise ValueError(
            f"the sinks cache re-rotates keys by fixed angles; rope_type {rope_type!r} changes "
            "its frequencies with the length"
        )
    if rope_type == "default":
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        return 1.0 / params.get("rope_theta", 10000.0) ** exponents
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[rope_type](config)[0].double()


def _inv_freq32(config: Any, who: str = "the retrieval cache re-rotates keys") -> Tensor:
    """The inverse frequencies exactly as transformers computes them (fp32), so that keys it
    rotated can be un-rotated with the same angles (or queries rotated as it rotates them)."""
    params, rope_type = _rope(config)
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        raise ValueError(
            f"{who} at fixed angles; rope_type {rope_type!r} changes its frequencies with the "
            "length"
        )
    if rope_type == "default":
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = params.get("rope_theta", 10000.0)
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[rope_type](config)[0].float()


def rotate_by(x: Tensor, delta: int, inv_freq: Tensor) -> Tensor:
    """Rotate keys (B, H, T, D), rotate-half layout, on by ``delta`` positions."""
    angles = delta * inv_freq.to(x.device, torch.float64)  # float64: delta may be large
    cos, sin = torch.cat((angles, angles)).cos().float(), torch.cat((angles, angles)).sin().float()
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated_half = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated_half * sin).to(x.dtype)


def unrotate(keys: Tensor, cos_sin: Rotations, start: int) -> Tensor:
    """Keys (B, H, T, D) transformers rotated at positions start.. back to before rotary (the
    same fp32 angles, so the round trip is exact to rounding)."""
    cos, sin = cos_sin(start, start + keys.shape[-2])
    return apply_rotary(keys, cos, -sin)


def rotate_ending_at(keys: Tensor, cos_sin: Rotations, end: int) -> Tensor:
    """Keys (B, H, T, D) kept before rotary, rotated to sit at positions end - T .. end - 1: the
    chunk at its true positions, everything returned before it contiguously right before."""
    cos, sin = cos_sin(end - keys.shape[-2], end)
    return apply_rotary(keys, cos, sin)


class PolicyLayer(CacheLayerMixin):
    """One decoder layer's cache under a memext policy; storage is allocated on first use."""

    is_compileable = False
    is_sliding = False

    def __init__(
        self, layout: Layout, inv_freq: Tensor | None = None, rotations: Rotations | None = None
    ):
        super().__init__()
        self.layout, self.inv_freq = layout, inv_freq
        self.cos_sin = rotations  # keys kept before rotary (kivi's pre_rotary)
        self.sinks, self.window, self.max_len = layout.sinks, layout.window, layout.max_len
        self.kv: KVLayer | None = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.cos_sin is not None:
            self.cos_sin.device = self.device
        self.kv = make_kv_layer(batch, heads, dim, self.layout, self.dtype, self.device)
        self.is_initialized = True

    def held(self) -> int:
        """How many tokens the cache returns before the next chunk."""
        n_sinks, recent_start = kept(self.cumulative_length, self.sinks, self.window)
        return n_sinks + self.cumulative_length - recent_start

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, t = self.cumulative_length, key_states.shape[-2]
        if self.max_len is not None and start + t > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} positions; {start + t} were asked for"
            )
        n_sinks, _ = kept(start, self.sinks, self.window)
        evicted = start - self.held()
        if self.cos_sin is not None:  # stored before rotary, returned at their true positions
            raw = unrotate(key_states, self.cos_sin, start)
            keys, values = self.kv.step(start, raw, value_states)
            self.cumulative_length += t
            return rotate_ending_at(keys, self.cos_sin, start + t), values
        keys, values = self.kv.step(start, key_states, value_states)
        if n_sinks and evicted:
            # Sinks move up to sit right before the kept window (see the module doc).
            keys = torch.cat(
                (rotate_by(keys[..., :n_sinks, :], evicted, self.inv_freq), keys[..., n_sinks:, :]),
                dim=-2,
            )
        self.cumulative_length += t
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The returned keys are placed contiguously right before the queries.
        held = self.held()
        return held + query_length, self.cumulative_length - held

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_len if self.max_len is not None else -1

    def reset(self) -> None:
        self.kv, self.is_initialized, self.cumulative_length = None, False, 0

    def nbytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "a memext policy cache keeps one sequence per batch row and cannot reorder, repeat "
            "or crop it: use greedy or sampled decoding without beams, assistants or "
            "num_return_sequences > 1"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _refuse


class RetrievalPolicyLayer(CacheLayerMixin):
    """One decoder layer's cache under the ``retrieval`` policy (see the module doc); the
    queries of each forward arrive through the hook ``PolicyCache.attach`` installs."""

    is_compileable = False
    is_sliding = False

    def __init__(self, policy: Retrieval, rotations: Rotations):
        super().__init__()
        self.policy, self.cos_sin = policy, rotations
        self.kv: RetrievalLayer | None = None
        self.queries: Tensor | None = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.cos_sin.device = self.device  # the model's: rotations are computed there
        self.kv = self.policy.make_layer(batch, heads, dim, self.dtype, self.device, self.cos_sin)
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        queries, self.queries = self.queries, None
        start, t = self.cumulative_length, key_states.shape[-2]
        if queries is None or queries.shape[-2] != t:
            raise ValueError(
                "the retrieval cache chooses blocks by each forward's queries, which "
                "transformers does not hand a cache: call cache.attach(model) before "
                "generate or a forward (memext.hf.cache.prefill does)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        raw = unrotate(key_states, self.cos_sin, start)
        keys, values = self.kv.step(start, raw, value_states, queries.to(key_states.dtype))
        self.cumulative_length += t
        return rotate_ending_at(keys, self.cos_sin, start + t), values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.policy.held(self.cumulative_length)
        return held + query_length, self.cumulative_length - held

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv, self.is_initialized, self.cumulative_length = None, False, 0
        self.queries = None

    def nbytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0

    def store_nbytes(self) -> int:
        return self.kv.store_nbytes() if self.kv is not None else 0

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = PolicyLayer._refuse


class SnapPolicyLayer(CacheLayerMixin):
    """One decoder layer's cache under the ``snapkv`` policy (``memext.infer.snapkv``): keys
    come in rotated at their true positions and are kept so; the queries of each forward arrive
    through the hook ``PolicyCache.attach`` installs, before rotary, and are rotated here at
    their positions (as transformers rotates them) for the prompt's vote."""

    is_compileable = False
    is_sliding = False

    def __init__(self, policy: SnapKV, rotations: Rotations):
        super().__init__()
        self.policy, self.cos_sin = policy, rotations
        self.kv: SnapLayer | None = None
        self.queries: Tensor | None = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.cos_sin.device = self.device
        self.kv = self.policy.make_layer(batch, heads, dim, self.dtype, self.device)
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        queries, self.queries = self.queries, None
        start, t = self.cumulative_length, key_states.shape[-2]
        if queries is None or queries.shape[-2] != t:
            raise ValueError(
                "the snapkv cache votes with the prompt's last queries, which transformers "
                "does not hand a cache: call cache.attach(model) before generate or a forward "
                "(memext.hf.cache.prefill does)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cos, sin = self.cos_sin(start, start + t)
        rotated = apply_rotary(queries.to(key_states.dtype), cos, sin)
        keys, values = self.kv.step(start, key_states, value_states, rotated)
        self.cumulative_length += t
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The kept keys sit contiguously before the queries; a first single token finds the
        # prompt already cut.
        held = self.kv.held_after(query_length) if self.kv is not None else 0
        return held + query_length, self.cumulative_length - held

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.policy.max_len

    def reset(self) -> None:
        self.kv, self.is_initialized, self.cumulative_length = None, False, 0
        self.queries = None

    def nbytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = PolicyLayer._refuse


def hf_rotations(inv_freq: Tensor, device: Any = "cpu") -> Rotations:
    """(cos, sin) at positions [start, stop) as transformers' rotary computes them (fp32 angles,
    no attention factor), shared by the layers of a cache."""

    def compute(positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    return Rotations(compute, device)


def _query_hook(cache: PolicyCache, layer: int, head_dim: int) -> Any:
    ref = weakref.ref(cache)

    def hook(module: Any, inputs: Any, output: Tensor) -> None:
        owner = ref()
        if owner is not None:  # (B, T, H·D) or (B, T, H, D) -> (B, H, T, D)
            b, t = output.shape[:2]
            owner.layers[layer].queries = output.reshape(b, t, -1, head_dim).transpose(1, 2)

    return hook


class PolicyCache(Cache):
    """A ``transformers.Cache`` running the memext policy registered as ``cache``, with its
    ``options`` (``window=...``; see ``memext.infer.cache``). ``config`` is the model's (layers,
    rotary)."""

    def __init__(self, config: Any, cache: str = "window", **options: Any):
        policy = CACHES.build(cache, **options)
        self.reads_queries = getattr(policy, "reads_queries", False)
        self.tail = prompt_tail(policy)  # a prompt's last tokens, read as a chunk alone
        self._hooks: list[Any] = []
        n = config.num_hidden_layers
        if isinstance(policy, Retrieval):
            rotations = hf_rotations(_inv_freq32(config))
            super().__init__(layers=[RetrievalPolicyLayer(policy, rotations) for _ in range(n)])
            self.policy, self.sinks, self.window = cache, policy.sinks, None
            return
        if isinstance(policy, SnapKV):
            rotations = hf_rotations(_inv_freq32(config, "the snapkv cache rotates queries"))
            super().__init__(layers=[SnapPolicyLayer(policy, rotations) for _ in range(n)])
            self.policy, self.sinks, self.window = cache, 0, None  # no band
            return
        layout = policy.layout()
        # Sinks are re-rotated only when tokens after them are evicted (a window).
        inv_freq = _inv_freq(config) if layout.sinks and layout.window is not None else None
        rotations = None
        if getattr(policy, "pre_rotary", False):  # kivi keeps every token: true positions
            rotations = hf_rotations(_inv_freq32(config, "kivi's pre_rotary re-rotates keys"))
        super().__init__(layers=[PolicyLayer(layout, inv_freq, rotations) for _ in range(n)])
        self.policy, self.sinks, self.window = cache, layout.sinks, layout.window

    def band(self, start: int, t: int, device: Any = None) -> Tensor | None:
        """The (t, keys) mask a chunk of ``t`` tokens read after ``start`` needs, None when plain
        causal does."""
        return band_mask(start, t, self.sinks, self.window, device)

    def attach(self, model: Any) -> PolicyCache:
        """Hook ``model``'s attention query projections so that a policy that reads queries
        (``retrieval``) gets them; nothing to do for the others. Returns the cache."""
        if not self.reads_queries or self._hooks:
            return self
        for module in model.modules():
            layer = getattr(module, "layer_idx", None)
            proj = getattr(module, "q_norm", None)
            proj = getattr(module, "q_proj", None) if proj is None else proj
            if layer is None or proj is None or not 0 <= layer < len(self.layers):
                continue
            hook = _query_hook(self, layer, module.head_dim)
            self._hooks.append(proj.register_forward_hook(hook))
        if len(self._hooks) != len(self.layers):
            self.detach()
            raise ValueError(
                f"the {self.policy!r} cache reads each layer's queries, but the model has no "
                "attention module with layer_idx and q_proj for every one of its "
                f"{len(self.layers)} layers"
            )
        return self

    def detach(self) -> None:
        """Remove the hooks ``attach`` installed."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def nbytes(self) -> int:
        """Bytes of the tensors held, all layers (the formulas: ``memext.infer.cache``; for
        ``retrieval`` what attention works from, ``memext.infer.retrieval``)."""
        return sum(layer.nbytes() for layer in self.layers)

    def store_nbytes(self) -> int:
        """Bytes of a retrieval cache's block store (0 for the other policies)."""
        return sum(getattr(layer, "store_nbytes", lambda: 0)() for layer in self.layers)


@torch.no_grad()
def prefill(model: Any, ids: Tensor, cache: PolicyCache, chunk: int) -> tuple[Tensor, PolicyCache]:
    """Read ``ids`` (B, T) into ``cache`` ``chunk`` tokens per forward (the policy's ``tail``
    alone: ``memext.infer.prefill.spans``), each chunk under the
    policy's exact band (an explicit 4D mask); a policy that reads queries is attached to
    ``model`` first (``PolicyCache.attach``). Returns the last position's logits (B, vocab)."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"prefill needs token ids shaped (B, T) with T >= 1, got {tuple(ids.shape)}"
        )
    cache.attach(model)
    logits = None
    for a, b in spans(ids.shape[1], chunk, cache.tail):
        # The vocabulary projection of the last position only.
        out = read_chunk(model, ids[:, a:b], cache, logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits, cache


def _check_fixed_angles(config: Any, start: int, t: int) -> None:
    """Refuse a forward that would attend to cached keys rotated at other frequencies: dynamic
    rope recomputes its frequencies once the input passes the original length, but keys an
    earlier forward cached keep the angles they were rotated at (seen: SmolLM2 dynamic x4 read
    in 1,024-token chunks scored 2.49 bits/byte at 16k against 0.855 in one forward)."""
    params, rope_type = _rope(config)
    original = params.get("original_max_position_embeddings") or config.max_position_embeddings
    if start > 0 and rope_type in _LENGTH_DEPENDENT_ROPE and start + t > original:
        raise ValueError(
            f"rope_type {rope_type!r} changes its frequencies past {original} tokens, so keys "
            f"cached by an earlier forward no longer match this one's angles: read the "
            f"{start + t}-token input in one forward (no chunk, no KV-cache policy)"
        )


@torch.no_grad()
def read_chunk(model: Any, piece: Tensor, cache: PolicyCache, **kwargs: Any) -> Any:
    """One forward of ``piece`` (B, t) at the positions after what ``cache`` holds, under the
    policy's exact band (an explicit 4D mask); ``kwargs`` go to the model (``logits_to_keep``).
    ``model`` may be a causal LM or its base model (hidden states). The model's output."""
    dtype = next(model.parameters()).dtype
    start, t = cache.get_seq_length(), piece.shape[1]
    _check_fixed_angles(model.config, start, t)
    positions = torch.arange(start, start + t, device=piece.device)[None].expand(piece.shape[0], -1)
    band = cache.band(start, t, piece.device)
    mask = None
    if band is not None:
        # Additive form: both the eager and the SDPA attention of transformers take it.
        mask = torch.zeros(band.shape, dtype=dtype, device=piece.device)
        mask = mask.masked_fill(~band, torch.finfo(dtype).min)[None, None]
        mask = mask.expand(piece.shape[0], 1, -1, -1)
    with _grouped_kv(piece.device):
        return model(
            input_ids=piece,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **kwargs,
            **cache_kwargs(model, cache),
        )


@contextlib.contextmanager
def _grouped_kv(device: torch.device) -> Iterator[None]:
    """transformers' SDPA attention repeats the keys and values to every query head whenever it is
    given a mask (on CUDA a masked grouped call falls back to the slow math kernel). A chunk after
    a cache always has a mask, so on SmolLM2 (9 query heads, 3 KV heads) each layer's K/V over
    the whole cache was copied 3×, most of a chunked prefill's activation memory. torch's CPU
    kernel takes grouped K/V with a mask directly (equal to the repeated call, tested): on the CPU
    ask transformers for that through its own switch, ``TRANSFORMERS_SDPA_FORCE_GQA``."""
    if device.type != "cpu":
        yield
        return
    before = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_FORCE_GQA]
        else:
            os.environ[_FORCE_GQA] = before


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"
