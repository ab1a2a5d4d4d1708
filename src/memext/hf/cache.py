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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from memext.hf.model import cache_kwargs
from memext.infer.cache import CACHES, KVLayer, Layout, band_mask, kept, make_kv_layer

# Rope types whose frequencies change with the sequence length: a fixed re-rotation is wrong.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _inv_freq(config: Any) -> Tensor:
    """The rotary inverse frequencies of a Hugging Face config (fixed-frequency rope types)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
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


def rotate_by(x: Tensor, delta: int, inv_freq: Tensor) -> Tensor:
    """Rotate keys (B, H, T, D), rotate-half layout, on by ``delta`` positions."""
    angles = delta * inv_freq.to(x.device, torch.float64)  # float64: delta may be large
    cos, sin = torch.cat((angles, angles)).cos().float(), torch.cat((angles, angles)).sin().float()
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated_half = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated_half * sin).to(x.dtype)


class PolicyLayer(CacheLayerMixin):
    """One decoder layer's cache under a memext policy; storage is allocated on first use."""

    is_compileable = False
    is_sliding = False

    def __init__(self, layout: Layout, inv_freq: Tensor | None = None):
        super().__init__()
        self.layout, self.inv_freq = layout, inv_freq
        self.sinks, self.window, self.max_len = layout.sinks, layout.window, layout.max_len
        self.kv: KVLayer | None = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
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


class PolicyCache(Cache):
    """A ``transformers.Cache`` running the memext policy registered as ``cache``, with its
    ``options`` (``window=...``; see ``memext.infer.cache``). ``config`` is the model's (layers,
    rotary)."""

    def __init__(self, config: Any, cache: str = "window", **options: Any):
        policy = CACHES.build(cache, **options)
        layout = policy.layout()
        inv_freq = _inv_freq(config) if layout.sinks else None
        layers = [PolicyLayer(layout, inv_freq) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.policy, self.sinks, self.window = cache, layout.sinks, layout.window

    def nbytes(self) -> int:
        """Bytes of the tensors held, all layers (the formulas: ``memext.infer.cache``)."""
        return sum(layer.nbytes() for layer in self.layers)


@torch.no_grad()
def prefill(model: Any, ids: Tensor, cache: PolicyCache, chunk: int) -> tuple[Tensor, PolicyCache]:
    """Read ``ids`` (B, T) into ``cache`` ``chunk`` tokens per forward, each chunk under the
    policy's exact band (an explicit 4D mask). Returns the last position's logits (B, vocab)."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"prefill needs token ids shaped (B, T) with T >= 1, got {tuple(ids.shape)}"
        )
    dtype = next(model.parameters()).dtype
    logits = None
    for a in range(0, ids.shape[1], chunk):
        piece = ids[:, a : a + chunk]
        start, t = cache.get_seq_length(), piece.shape[1]
        positions = torch.arange(start, start + t, device=ids.device)[None].expand(ids.shape[0], -1)
        band = band_mask(start, t, cache.sinks, cache.window, ids.device)
        mask = None
        if band is not None:
            # Additive form: both the eager and the SDPA attention of transformers take it.
            mask = torch.zeros(band.shape, dtype=dtype, device=ids.device)
            mask = mask.masked_fill(~band, torch.finfo(dtype).min)[None, None]
            mask = mask.expand(ids.shape[0], 1, -1, -1)
        out = model(
            input_ids=piece,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(model, cache),
        )
        logits = out.logits[:, -1]
    return logits, cache
