"""block_sparse attention: the kernel equals a dense-mask reference, and the pattern obeys its rules."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bf16_rule import assert_within_reference_error
from memext.config import Config, ModelConfig
from memext.infer.generate import generate_ids, new_state
from memext.model import build_model
from memext.nn.attention import build_attention
from memext.nn.attention.block_sparse import BlockSparseAttention
from memext.nn.reference import attention, block_sparse_mask


def _kernel(
    block_size: int = 16, window: int = 40, random_blocks: int = 2, global_tokens: int = 0
) -> BlockSparseAttention:
    return BlockSparseAttention(
        block_size=block_size,
        window=window,
        random_blocks=random_blocks,
        global_tokens=global_tokens,
    )


def _ref_mask(ker: BlockSparseAttention, tq: int, tk: int, causal: bool) -> torch.Tensor:
    """The naive block-by-block mask, given only the kernel's random draw."""
    rand = ker.random_table(ker.n_blocks(tk), causal).tolist()
    return block_sparse_mask(
        tq,
        tk,
        block_size=ker.block_size,
        window=ker.window,
        global_tokens=ker.global_tokens,
        causal=causal,
        random_blocks=rand,
    )


def _qkv(
    b: int, h: int, tq: int, tk: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, tk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, tk, d, generator=gen, dtype=torch.float64)
    return tuple(x.to(dtype).requires_grad_() for x in (q, k, v))  # type: ignore[return-value]


def _check_against_reference(
    ker: BlockSparseAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    grads: bool = True,
) -> None:
    tq, tk = q.shape[2], k.shape[2]
    mask = _ref_mask(ker, tq, tk, causal)
    out = ker(q, k, v, causal=causal)
    ref = attention(q, k, v, mask)
    assert (out - ref).abs().max().item() <= 1e-5
    if grads:
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
        g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, b in zip(g_out, g_ref, strict=True):
            assert (a - b).abs().max().item() <= 1e-4


# --- the kernel equals the reference ----------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("global_tokens", [0, 20])
@pytest.mark.parametrize(
    ("t", "block_size", "head_dim"), [(1, 16, 32), (97, 16, 64), (1025, 48, 32)]
)
def test_forward_and_gradients_match_reference(
    causal: bool, global_tokens: int, t: int, block_size: int, head_dim: int
) -> None:
    ker = _kernel(block_size=block_size, window=2 * block_size + 5, global_tokens=global_tokens)
    _check_against_reference(ker, *_qkv(2, 2, t, t, head_dim), causal)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("global_tokens", [0, 1, 70])
@pytest.mark.parametrize("t", [1, 97, 1025])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize(("block_size", "window", "random_blocks"), [(16, 33, 3), (64, 200, 1)])
def test_forward_and_gradients_match_reference_grid(
    causal: bool,
    global_tokens: int,
    t: int,
    head_dim: int,
    block_size: int,
    window: int,
    random_blocks: int,
) -> None:
    ker = _kernel(block_size, window, random_blocks, global_tokens)
    _check_against_reference(ker, *_qkv(3, 2, t, t, head_dim, seed=t), causal)


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_error_is_within_twice_the_reference_error(causal: bool) -> None:
    ker = _kernel(block_size=32, window=70, random_blocks=2, global_tokens=10)
    q, k, v = _qkv(2, 2, 300, 300, 64, dtype=torch.float64)
    mask = _ref_mask(ker, 300, 300, causal)
    exact = attention(q, k, v, mask)
    q16, k16, v16 = (x.detach().to(torch.bfloat16) for x in (q, k, v))
    low = attention(q16, k16, v16, mask)
    # flash-attention's rule, norm-wise
    assert_within_reference_error("out", ker(q16, k16, v16, causal=causal), low, exact, 2.0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq", [1, 5, 16, 40])
def test_queries_at_the_end_of_the_keys(causal: bool, tq: int) -> None:
    """KV-cached decoding and chunked prefill: the last Tq rows of the Tk-key pattern."""
    ker = _kernel(block_size=16, window=20, random_blocks=2, global_tokens=3)
    q, k, v = _qkv(2, 3, 150, 150, 32)
    _check_against_reference(ker, q[:, :, -tq:].detach().requires_grad_(), k, v, causal)
    if causal:  # a row depends on its position only, so the full run's last rows agree
        full = ker(q, k, v, causal=True)[:, :, -tq:]
        assert (ker(q[:, :, -tq:], k, v, causal=True) - full).abs().max().item() <= 1e-6


@given(
    tk=st.integers(1, 200),
    tq_frac=st.floats(0.0, 1.0),
    block_size=st.integers(1, 70),
    window=st.integers(1, 150),
    random_blocks=st.integers(0, 4),
    global_tokens=st.integers(0, 40),
    causal=st.booleans(),
    padded=st.booleans(),
)
@settings(max_examples=15, deadline=None)
def test_property_matches_reference(
    tk: int,
    tq_frac: float,
    block_size: int,
    window: int,
    random_blocks: int,
    global_tokens: int,
    causal: bool,
    padded: bool,
) -> None:
    tq = max(1, round(tq_frac * tk))
    ker = _kernel(block_size, window, random_blocks, global_tokens)
    q, k, v = _qkv(2, 2, tq, tk, 8, seed=tk)
    mask = _ref_mask(ker, tq, tk, causal)
    key_padding = None
    if padded:
        key_padding = torch.rand(2, tk, generator=torch.Generator().manual_seed(tk)) > 0.3
        mask = mask & key_padding[:, None, None, :]
    out = ker(q, k, v, causal=causal, key_padding=key_padding)
    ref = attention(q, k, v, mask)
    seen = mask.expand((*ref.shape[:3], tk)).any(dim=-1)  # rows with a visible key
    if seen.any():
        assert (out - ref)[seen].abs().max().item() <= 1e-5
    assert (out[~seen] == 0).all()  # no visible key: zeros, never NaN
    assert out.isfinite().all()


# --- the pattern ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("global_tokens", [0, 5, 40])
@pytest.mark.parametrize(("block_size", "window"), [(8, 1), (8, 17), (16, 16), (7, 60)])
def test_mask_matches_naive_builder(
    causal: bool, global_tokens: int, block_size: int, window: int
) -> None:
    ker = _kernel(block_size, window, 2, global_tokens)
    for tq, tk in [(131, 131), (1, 131), (9, 131), (3, 3)]:
        assert torch.equal(ker.mask(tq, tk, causal), _ref_mask(ker, tq, tk, causal))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("global_tokens", [0, 7])
def test_window_covering_the_sequence_is_full_attention(causal: bool, global_tokens: int) -> None:
    # Bidirectional windows are split W/2 per side, so it takes W >= 2T to reach everything.
    t = 100
    window = t if causal else 2 * t
    ker = _kernel(block_size=16, window=window, random_blocks=0, global_tokens=global_tokens)
    full = torch.ones(t, t, dtype=torch.bool)
    assert torch.equal(ker.mask(t, t, causal), full.tril() if causal else full)
    q, k, v = _qkv(2, 2, t, t, 32)
    dense = build_attention("full")(q, k, v, causal=causal)
    assert (ker(q, k, v, causal=causal) - dense).abs().max().item() <= 1e-5


def test_random_blocks_follow_the_rules() -> None:
    for causal in (True, False):
        ker = _kernel(block_size=8, window=24, random_blocks=3, global_tokens=10)
        n = 40
        g = math.ceil(10 / 8)
        before, after = ker.band(causal)
        table = ker.random_table(n, causal)
        for i, row in enumerate(table.tolist()):
            picked = [j for j in row if j >= 0]
            band = set(range(i - before, i + after + 1))
            allowed = [j for j in range(g, i if causal else n) if j not in band]
            assert len(set(picked)) == len(picked) == min(3, len(allowed))
            assert set(picked) <= set(allowed)


def test_layout_is_deterministic_and_prefix_consistent() -> None:
    a, b = _kernel(random_blocks=3), _kernel(random_blocks=3)
    for causal in (True, False):
        assert torch.equal(a.layout(1000, causal), b.layout(1000, causal))
        assert torch.equal(a.mask(300, 1000, causal), b.mask(300, 1000, causal))
    # Causal rows depend on their block alone: a prefix sees the same pattern at any length.
    short, long = a.layout(200, True), a.layout(1000, True)
    assert torch.equal(long[: short.shape[0], : short.shape[0]], short)
    # Different seeds give different draws (the draw is not all-zero or constant).
    other = BlockSparseAttention(block_size=16, window=40, random_blocks=3, layout_seed=1)
    assert not torch.equal(a.layout(1000, True), other.layout(1000, True))


def test_key_padding_hides_keys() -> None:
    ker = _kernel(block_size=16, window=40, random_blocks=2, global_tokens=5)
    q, k, v = _qkv(2, 2, 90, 90, 32)
    key_padding = torch.ones(2, 90, dtype=torch.bool)
    key_padding[0, 60:] = False  # right padding, as an encoder batch has
    key_padding[1, ::3] = False
    for causal in (True, False):
        out = ker(q, k, v, causal=causal, key_padding=key_padding)
        mask = _ref_mask(ker, 90, 90, causal) & key_padding[:, None, None, :]
        ref = attention(q, k, v, mask)
        seen = ref.isfinite().all(dim=-1)  # causal query 0 of row 1 has no real key to see
        assert (~seen).sum() == (2 if causal else 0)
        assert (out - ref)[seen].abs().max().item() <= 1e-5
        assert (out[~seen] == 0).all()
        # Changing the padded keys and values changes nothing.
        k2 = torch.where(key_padding[:, None, :, None], k, 100.0)
        v2 = torch.where(key_padding[:, None, :, None], v, -100.0)
        out2 = ker(q, k2, v2, causal=causal, key_padding=key_padding.int())
        assert (out - out2).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 0},
        {"block_size": -4},
        {"block_size": 2.5},
        {"window": 0},
        {"random_blocks": -1},
        {"global_tokens": -1},
        {"layout_seed": -1},
        {"block_size": True},
    ],
)
def test_bad_settings_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="block_sparse: "):
        BlockSparseAttention(**kwargs)


def test_bad_inputs_raise() -> None:
    ker = _kernel()
    q, k, v = _qkv(1, 2, 10, 10, 8)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        ker(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match="key_padding must be"):
        ker(q, k, v, key_padding=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected q"):
        ker(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="tq <= tk"):
        ker.mask(5, 3)


def test_built_from_model_config() -> None:
    cfg = ModelConfig(
        attention="block_sparse", block_size=32, window=96, random_blocks=1, global_tokens=4
    )
    ker = build_attention(cfg.attention, dataclasses.asdict(cfg))
    assert isinstance(ker, BlockSparseAttention)
    assert (ker.block_size, ker.window, ker.random_blocks, ker.global_tokens) == (32, 96, 1, 4)


# --- in a model -------------------------------------------------------------------------------
def test_tiny_model_cached_generation_equals_recompute() -> None:
    cfg = dataclasses.replace(
        Config.preset("tiny").model,
        memory="none",
        attention="block_sparse",
        block_size=8,
        window=16,
        random_blocks=2,
        global_tokens=4,
        n_layers=2,
        max_seq_len=128,
        init_std=0.2,  # peaked logits keep greedy choices far from ties
    )
    model = build_model(cfg, seed=0).eval()
    prompt = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    n = 44  # 64 tokens = 8 blocks: random blocks come into play from block 4 on
    with torch.no_grad():
        seq, recomputed = list(prompt), []
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0][0, -1]
            recomputed.append(logits)
            seq.append(int(logits.argmax()))
        state = new_state(model, 1, len(prompt) + n)
        logits, state = model(torch.tensor([prompt]), state)
        cached = []
        for i in range(n):
            cached.append(logits[0, -1])
            logits, state = model(torch.tensor([[seq[len(prompt) + i]]]), state)
    assert (torch.stack(cached) - torch.stack(recomputed)).abs().max().item() <= 1e-4
    assert list(generate_ids(model, prompt, n, temperature=0)) == seq[len(prompt) :]
    assert len(set(seq[len(prompt) :])) > 3  # not trivially passed by a constant output
