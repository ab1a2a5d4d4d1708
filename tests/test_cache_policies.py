"""KV-cache policies: window = band-masked full attention, sinks = StreamingLLM at cache
positions, quantized within its error bound, nbytes = the documented formulas, bad input refused.

Tolerances (fp32, logits of a model with init_std 0.2): exact-policy comparisons <= 2e-5 max abs
(float summation order differs between a cached and a one-shot forward); quantization error per
element <= scale/2 (+ 1e-6 relative for the fp32 division); quantized greedy decoding identical.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from memext.config import ModelConfig
from memext.infer.cache import CACHES, build_cache, cache_options
from memext.infer.generate import generate_ids, new_state
from memext.infer.kv_store import ChannelGroups, Int8Ring, quantize_int8
from memext.model import build_model
from memext.nn.attention import AttentionKernel
from memext.nn.reference import attention, sliding_mask
from memext.nn.transformer import LongLM

TOL = 2e-5


def _model(n_layers: int = 2, **changes) -> LongLM:
    cfg = ModelConfig(
        vocab_size=264, d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=512, init_std=0.2
    )
    return build_model(dataclasses.replace(cfg, **changes), seed=0).eval()


def _tokens(b: int, t: int, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


class _BandKernel(AttentionKernel):
    """The reference: an explicit ``sliding_mask`` and a plain softmax, bottom-right aligned."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, *, causal=True, key_padding=None):
        return attention(q, k, v, sliding_mask(q.shape[-2], k.shape[-2], self.window))


def _band_model(model: LongLM, window: int) -> LongLM:
    ref = copy.deepcopy(model)  # same weights
    for block in ref.blocks:
        block.attn.kernel = _BandKernel(window)
    return ref


@torch.no_grad()
def _read(model: LongLM, tokens: Tensor, state, chunk: int) -> Tensor:
    out = []
    for a in range(0, tokens.shape[1], chunk):
        logits, state = model(tokens[:, a : a + chunk], state)
        out.append(logits)
    return torch.cat(out, dim=1)


# --- window -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 9, 13, 60])
def test_window_equals_band_masked_attention(chunk: int) -> None:
    model, w = _model(), 8
    tokens = _tokens(2, 60)
    with torch.no_grad():
        ref = _band_model(model, w)(tokens)[0]
    got = _read(model, tokens, new_state(model, 2, cache="window", window=w), chunk)
    assert (got - ref).abs().max().item() <= TOL


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 2),
    t=st.integers(1, 48),
    w=st.integers(1, 20),
    chunks=st.lists(st.integers(1, 17), min_size=1, max_size=6),
)
def test_window_equals_band_masked_attention_any_chunking(b, t, w, chunks) -> None:
    model = _model()
    tokens = _tokens(b, t, seed=t)
    with torch.no_grad():
        ref = _band_model(model, w)(tokens)[0]
        state, out, a, i = new_state(model, b, cache="window", window=w), [], 0, 0
        while a < t:  # ragged chunks, then the last size repeated
            size = chunks[min(i, len(chunks) - 1)]
            logits, state = model(tokens[:, a : a + size], state)
            out.append(logits)
            a, i = a + size, i + 1
    assert (torch.cat(out, 1) - ref).abs().max().item() <= TOL


def test_window_reads_past_max_seq_len_but_full_does_not() -> None:
    model = _model(max_seq_len=32)
    tokens = _tokens(1, 100)
    reference = _band_model(model, 8)
    reference.max_seq_len = 100  # the reference reads the whole stream in one forward
    with torch.no_grad():
        want = reference(tokens)[0]
        got = _read(model, tokens, new_state(model, 1, cache="window", window=8), 10)
        assert (got - want).abs().max().item() <= TOL
        with pytest.raises(ValueError, match=r"sequence of 40 tokens exceeds .* max_seq_len=32"):
            model(tokens[:, :40], new_state(model, 1, cache="window", window=8))  # one chunk
        state = new_state(model, 1, 200, cache="full")
        _, state = model(tokens[:, :30], state)
        with pytest.raises(ValueError, match=r"sequence of 33 tokens exceeds .* max_seq_len=32"):
            model(tokens[:, 30:33], state)


# --- sinks ------------------------------------------------------------------------------------
class _Recorder(nn.Module):
    """Wraps a Rotary and records the positions it is asked for."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary, self.calls = rotary, []

    def forward(self, positions: Tensor, seq_len: int | None = None):
        self.calls.append(positions.tolist())
        return self.rotary(positions, seq_len=seq_len)


def test_sinks_positions_are_consecutive_after_eviction() -> None:
    model, s, w = _model(n_layers=1), 4, 6
    recorder = _Recorder(model.rotary)
    model.rotary = recorder
    tokens = _tokens(1, 30)
    state = new_state(model, 1, cache="sinks", sinks=s, window=w)
    assert state.cache.rotary is recorder
    with torch.no_grad():
        for i in range(30):
            recorder.calls.clear()
            _, state = model(tokens[:, i : i + 1], state)
            query_call, *key_calls = recorder.calls  # LongLM's queries, then the cache's keys
            held = min(i, s + w - 1)  # tokens kept before this one
            assert query_call == [held]
            # Keys at 0..held; the cache recomputes that table only when its length changes.
            assert all(call == list(range(held + 1)) for call in key_calls)
            assert key_calls or held == s + w - 1
            assert state.cache.position(i + 1) == min(i + 1, s + w - 1)
    # What is kept after eviction: the raw (pre-rotary) keys of the first s and last w-1 tokens.
    attn = model.blocks[0].attn
    with torch.no_grad():
        x = model.blocks[0].attn_norm(model.embed(tokens))
        k_raw = attn.qkv(x).view(1, 30, 3, attn.n_heads, attn.head_dim)[:, :, 1].transpose(1, 2)
    layer = state.cache.layers[0]
    sinks = torch.cat(layer.sink_store.read(0, s)[0], -2)
    recent = torch.cat(layer.recent.read(30 - (w - 1), 30)[0], -2)
    # (1e-5: one token's projection against thirty's, a different matmul blocking)
    assert (sinks - k_raw[..., :s, :]).abs().max().item() <= 1e-5
    assert (recent - k_raw[..., 30 - (w - 1) :, :]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("s", "w"), [(1, 1), (4, 8), (2, 5)])
def test_sinks_decode_equals_fresh_forward_over_sinks_and_window(s: int, w: int) -> None:
    model = _model(n_layers=1)  # one layer: cached keys depend on their own token only
    tokens = _tokens(1, 40, seed=3)
    state = new_state(model, 1, cache="sinks", sinks=s, window=w)
    with torch.no_grad():
        _, state = model(tokens[:, :1], state)
        for i in range(1, 40):
            logits, state = model(tokens[:, i : i + 1], state)
            kept = tokens[:, : min(s, i + 1)]
            recent = tokens[:, max(s, i + 1 - w) : i + 1]
            fresh = model(torch.cat((kept, recent), dim=1))[0][:, -1]
            assert (logits[:, -1] - fresh).abs().max().item() <= 1e-5, i


def test_sinks_chunked_before_eviction_equals_full_attention() -> None:
    model, s, w = _model(), 4, 16
    tokens = _tokens(2, 19)  # s + w - 1: nothing is evicted yet
    with torch.no_grad():
        ref = model(tokens)[0]
    got = _read(model, tokens, new_state(model, 2, cache="sinks", sinks=s, window=w), 5)
    assert (got - ref).abs().max().item() <= TOL


# --- quantized --------------------------------------------------------------------------------
def _within_half_scale(x: Tensor, y: Tensor, scale: Tensor) -> bool:
    return bool(((x - y).abs() <= scale / 2 + 1e-6 * x.abs()).all())


def test_int8_codes_are_within_half_a_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 16, generator=gen) * torch.logspace(-3, 2, 16)  # channel outliers
    x[0, 0, 7] = 0.0  # an all-zero token: scale 0, codes 0, no NaN
    for dim in (-1, -2):
        codes, scale = quantize_int8(x, dim)
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
        assert _within_half_scale(x, codes.float() * scale, scale)
    assert torch.equal(quantize_int8(x, -1)[0][0, 0, 7], torch.zeros(16, dtype=torch.int8))


@pytest.mark.parametrize("store", ["token", "channel"])
def test_stores_return_what_was_written_within_the_bound(store: str) -> None:
    gen = torch.Generator().manual_seed(1)
    cap, group, t = 11, 4, 37
    x = torch.randn(1, 2, t, 8, generator=gen) * torch.logspace(-2, 1, 8)
    v = torch.randn(1, 2, t, 8, generator=gen)
    ring = Int8Ring(1, 2, 8, cap) if store == "token" else ChannelGroups(1, 2, 8, cap, group)
    end = 0
    for size in (1, 5, 2, 9, 1, 1, 3, 15):  # chunks crossing group and ring boundaries
        ring.write(end, x[..., end : end + size, :], v[..., end : end + size, :])
        end += size
        lo = max(0, end - cap)
        ks, vs = ring.read(lo, end)
        k_back, v_back = torch.cat(ks, -2), torch.cat(vs, -2)
        k_true, v_true = x[..., lo:end, :], v[..., lo:end, :]
        v_scale = v_true.abs().amax(-1, keepdim=True) / 127
        assert _within_half_scale(v_true, v_back, v_scale)
        if store == "token":
            k_scale = k_true.abs().amax(-1, keepdim=True) / 127
        else:  # per channel over each whole group; the newest incomplete group is exact
            done = end // group * group
            k_scale = torch.zeros_like(k_true)
            for a in range(lo, end):
                g = a // group
                if a < done:
                    members = x[..., g * group : (g + 1) * group, :]
                    k_scale[..., a - lo, :] = members.abs().amax(-2) / 127
            assert torch.equal(
                k_back[..., max(done, lo) - lo :, :], k_true[..., max(done, lo) - lo :, :]
            )
        assert _within_half_scale(k_true, k_back, k_scale)


@pytest.mark.parametrize(
    "options",
    [
        {"axis": "token"},
        {"axis": "channel", "group": 8},
        {"axis": "token", "policy": "window", "window": 64},
        {"axis": "channel", "policy": "sinks", "sinks": 4, "window": 64, "group": 16},
    ],
)
def test_quantized_greedy_equals_full_cache(options: dict) -> None:
    model = _model()
    prompt = _tokens(1, 12, seed=5)[0].tolist()
    full = list(generate_ids(model, prompt, 32, temperature=0))
    got = list(
        generate_ids(model, prompt, 32, temperature=0, cache="quantized", cache_options=options)
    )
    assert got == full
    assert len(set(full)) > 3


# --- nbytes -----------------------------------------------------------------------------------
def _held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable from obj's attributes (not modules)."""
    seen = set() if seen is None else seen
    if isinstance(obj, Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_held_bytes(o, seen) for o in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        return sum(_held_bytes(o, seen) for o in vars(obj).values())
    return 0


L, B, H, D = 2, 3, 2, 16  # layers, batch, heads, head_dim of the caches below


def _formula(name: str, e: int = 4, **o) -> int:
    """The bytes formulas of memext.infer.cache's docstring."""
    s, w, g = o.get("sinks", 0), o.get("window"), o.get("group", 32)
    if name == "full":
        return 2 * L * B * H * o["max_len"] * D * e
    if name == "window":
        return 2 * L * B * H * (w - 1) * D * e
    if name == "sinks":
        return 2 * L * B * H * (s + w - 1) * D * e
    c = o["max_len"] if o.get("policy", "full") == "full" else w - 1
    sinks = 2 * L * B * H * s * D * e if o.get("policy") == "sinks" else 0
    if o.get("axis", "token") == "token":
        return L * B * H * 2 * c * (D + 4) + sinks
    n = math.ceil(c / g)
    return L * B * H * (n * g * D + n * 4 * D + (g - 1) * D * e + c * (D + 4)) + sinks


CASES = [
    ("full", {"max_len": 50}),
    ("window", {"window": 9}),
    ("window", {"window": 1}),
    ("sinks", {"sinks": 4, "window": 9}),
    ("quantized", {"max_len": 50}),
    ("quantized", {"max_len": 50, "axis": "channel", "group": 8}),
    ("quantized", {"policy": "window", "window": 9}),
    ("quantized", {"policy": "window", "window": 20, "axis": "channel", "group": 8}),
    ("quantized", {"policy": "sinks", "sinks": 4, "window": 9, "axis": "channel", "group": 4}),
]


@pytest.mark.parametrize(("name", "options"), CASES)
def test_nbytes_matches_formula_and_tensors_and_stays_flat(name: str, options: dict) -> None:
    rotary = _model().rotary
    extra = {"rotary": rotary} if "rotary" in cache_options(name) else {}
    cache = build_cache(name, L, B, H, D, **options, **extra)
    assert cache.nbytes() == _formula(name, **options)
    assert _held_bytes(getattr(cache, "layers", cache)) == cache.nbytes()
    bounded = name != "full" and options.get("policy", "x") != "full" and "max_len" not in options
    n_tokens = 120 if bounded else 50
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for a in range(0, n_tokens, 7):
        t = min(7, n_tokens - a)
        for layer in range(L):
            k, v = (torch.randn(B, H, t, D, generator=gen) for _ in range(2))
            cache.update(layer, k, v)
        cache.advance(t)
        sizes.append((cache.nbytes(), _held_bytes(getattr(cache, "layers", cache))))
    assert set(sizes) == {(_formula(name, **options),) * 2}


def test_nbytes_in_bf16_uses_two_byte_elements() -> None:
    cache = build_cache(
        "sinks", L, B, H, D, sinks=2, window=5, rotary=_model().rotary, dtype=torch.bfloat16
    )
    assert cache.nbytes() == _formula("sinks", e=2, sinks=2, window=5)


# --- bad input --------------------------------------------------------------------------------
def test_registry_lists_the_policies() -> None:
    assert {"full", "window", "sinks", "quantized"} <= set(CACHES)
    assert "window" in cache_options("window")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("nope", {}, r"unknown cache 'nope': expected one of .*full.*window"),
        ("window", {"window": 8, "sinks": 2}, r"cache 'window' takes no option sinks"),
        ("window", {"window": 0}, r"window must be a positive number of tokens, got window=0"),
        ("window", {"window": -3}, r"window=-3"),
        ("window", {}, r"the cache needs window=N"),
        (
            "sinks",
            {"sinks": 0, "window": 4, "rotary": None},
            r"sinks must be a positive .* sinks=0",
        ),
        ("sinks", {"sinks": 2, "window": 0, "rotary": None}, r"window=0"),
        ("sinks", {"sinks": 2, "window": 4}, r"pass rotary=model.rotary"),
        ("full", {"max_len": 0}, r"max_len must be a positive"),
        ("quantized", {}, r"needs max_len=N"),
        ("quantized", {"policy": "window"}, r"needs window=N"),
        ("quantized", {"policy": "ring", "window": 4}, r"policy must be full, window or sinks"),
        ("quantized", {"max_len": 8, "axis": "head"}, r"axis must be 'token' or 'channel'"),
        ("quantized", {"max_len": 8, "group": 0}, r"group must be a positive"),
    ],
)
def test_bad_cache_options_are_refused(name: str, options: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build_cache(name, L, B, H, D, **options)


def test_prompt_longer_than_a_full_cache_is_refused() -> None:
    model = _model(max_seq_len=32)
    with pytest.raises(ValueError, match=r"= 45 exceeds the model's limit max_seq_len=32"):
        list(generate_ids(model, [1] * 40, 5))
    with pytest.raises(ValueError, match=r"= 45 exceeds the model's limit max_seq_len=32"):
        list(generate_ids(model, [1] * 40, 5, cache="quantized"))
    state = new_state(model, 1, 16, cache="quantized")
    with pytest.raises(ValueError, match="the KV cache holds 16 positions; 20 were asked for"):
        model(torch.zeros(1, 20, dtype=torch.long), state)
    # A bounded cache reads the same prompt.
    assert (
        len(list(generate_ids(model, [1] * 40, 5, cache="window", cache_options={"window": 8})))
        == 5
    )
