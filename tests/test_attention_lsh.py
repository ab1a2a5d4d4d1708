"""LSH attention: the kernel against its dense twin, its special cases, settings and the model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bf16_rule import assert_within_reference_error
from memext.config import Config
from memext.infer.generate import generate_ids
from memext.model import build_model
from memext.nn import reference
from memext.nn.attention import ATTENTION, build_attention
from memext.nn.attention.lsh import SELF_SCORE, LSHAttention
from memext.nn.reference import lsh_reference


def _inputs(b, h, t, d, *, seed=0, dtype=torch.float32, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=gen).to(dtype).requires_grad_(grad)
    v = torch.randn(b, h, t, d, generator=gen).to(dtype).requires_grad_(grad)
    return q, v


def _kernel(chunk, rounds=2, buckets=0, seed=0) -> LSHAttention:
    return LSHAttention(
        lsh_chunk=chunk, lsh_rounds=rounds, lsh_buckets=buckets, lsh_seed=seed
    ).eval()


def _shared_qk_mask(tq: int, tk: int, causal: bool) -> torch.Tensor:
    """Dense (Tq, Tk) mask of exact shared-QK attention: every visible key but oneself, unless
    oneself is all there is (what the self score amounts to)."""
    q_pos, k_pos = torch.arange(tk - tq, tk)[:, None], torch.arange(tk)[None, :]
    visible = reference.causal_mask(tq, tk) if causal else torch.ones(tq, tk, dtype=torch.bool)
    others = visible & (k_pos != q_pos)
    alone = ~others.any(dim=-1, keepdim=True)
    return others | (alone & (k_pos == q_pos))


# (B, H, T, D, chunk, rounds, buckets, causal): T = 1, not a multiple of the chunk, a multiple.
CASES = [
    (2, 2, 1, 32, 64, 2, 0, True),
    (2, 1, 1, 64, 8, 1, 0, False),
    (2, 3, 97, 32, 16, 2, 0, True),
    (3, 2, 97, 64, 8, 3, 4, False),
    (1, 2, 128, 32, 16, 2, 0, True),
    (2, 2, 1025, 64, 64, 2, 0, True),
    (1, 2, 1025, 32, 32, 2, 8, False),
]


@pytest.mark.parametrize(("b", "h", "t", "d", "chunk", "rounds", "buckets", "causal"), CASES)
def test_matches_reference_fp32(b, h, t, d, chunk, rounds, buckets, causal):
    kernel = _kernel(chunk, rounds, buckets)
    q, v = _inputs(b, h, t, d, grad=True)
    out = kernel(q, q, v, causal=causal)
    ref = lsh_reference(q, v, kernel.hash(q), chunk=chunk, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out - ref).abs().max() <= 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, v), g)
    want = torch.autograd.grad(ref, (q, v), g)
    for x, y in zip(got, want, strict=True):
        assert (x - y).abs().max() <= 1e-4


@pytest.mark.parametrize(("t", "chunk"), [(97, 16), (1025, 64)])
def test_matches_reference_bf16(t, chunk):
    kernel = _kernel(chunk)
    q, v = _inputs(2, 2, t, 64, dtype=torch.bfloat16)
    buckets = kernel.hash(q)
    out = kernel(q, q, v)
    assert out.dtype == torch.bfloat16
    exact = lsh_reference(q.double(), v.double(), buckets, chunk=chunk, causal=True)
    ref = lsh_reference(q, v, buckets, chunk=chunk, causal=True)
    assert_within_reference_error("out", out, ref, exact, 2.0)  # flash-attention's rule


def test_key_padding_matches_reference():
    kernel = _kernel(16, rounds=2)
    q, v = _inputs(2, 2, 75, 32, grad=True)
    pad = torch.ones(2, 75, dtype=torch.bool)
    pad[0, 60:] = False  # right padding
    pad[1, :5] = False  # left padding
    out = kernel(q, q, v, causal=True, key_padding=pad)
    ref = lsh_reference(q, v, kernel.hash(q), chunk=16, causal=True, key_padding=pad)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.isfinite(out).all()
    g = torch.randn_like(out)
    for x, y in zip(
        torch.autograd.grad(out, (q, v), g), torch.autograd.grad(ref, (q, v), g), strict=True
    ):
        assert (x - y).abs().max() <= 1e-4


def test_padded_keys_get_no_weight():
    # Changing a hidden key's value must not change any real query's output.
    kernel = _kernel(8, rounds=2)
    q, v = _inputs(1, 2, 30, 16)
    pad = torch.ones(1, 30, dtype=torch.bool)
    pad[0, 10] = False
    out = kernel(q, q, v, causal=False, key_padding=pad)
    v2 = v.clone()
    v2[:, :, 10] += 100.0
    out2 = kernel(q, q, v2, causal=False, key_padding=pad)
    real = torch.arange(30) != 10
    torch.testing.assert_close(out[:, :, real], out2[:, :, real])


def test_only_value_gradient():
    kernel = _kernel(8)
    q, _ = _inputs(1, 2, 40, 16)
    _, v = _inputs(1, 2, 40, 16, seed=1, grad=True)
    out = kernel(q, q, v)
    ref = lsh_reference(q, v, kernel.hash(q), chunk=8, causal=True)
    (got,) = torch.autograd.grad(out.sum(), v)
    (want,) = torch.autograd.grad(ref.sum(), v)
    assert (got - want).abs().max() <= 1e-4


def test_gradcheck_fp64():
    kernel = _kernel(4, rounds=3)
    q, v = _inputs(1, 2, 13, 8, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kernel(a, a, b), (q, v))


@pytest.mark.parametrize("causal", [True, False])
def test_one_bucket_one_round_is_full_shared_qk(causal):
    t = 50
    # Two buckets (they come in pairs), but one chunk holds every position: nothing is missed.
    kernel = _kernel(64, rounds=1, buckets=2)
    q, v = _inputs(2, 2, t, 32)
    out = kernel(q, q, v, causal=causal)
    keys = F.normalize(q, dim=-1)
    want = reference.attention(q, keys, v, _shared_qk_mask(t, t, causal))
    assert (out - want).abs().max() <= 1e-5


@pytest.mark.parametrize(("tq", "causal"), [(1, True), (5, True), (3, False)])
def test_cached_queries_attend_exactly(tq, causal):
    tk = 40
    kernel = _kernel(8)
    keys_q, v = _inputs(2, 2, tk, 16)
    q = keys_q[:, :, tk - tq :]
    out = kernel(q, keys_q, v, causal=causal)
    mask = _shared_qk_mask(tq, tk, causal)
    want = reference.attention(q, F.normalize(keys_q, dim=-1), v, mask)
    assert out.shape == q.shape
    assert (out - want).abs().max() <= 1e-5


def test_cached_queries_respect_key_padding():
    kernel = _kernel(8)
    keys_q, v = _inputs(1, 1, 12, 8)
    pad = torch.ones(1, 12, dtype=torch.bool)
    pad[0, :4] = False
    out = kernel(keys_q[:, :, -1:], keys_q, v, key_padding=pad)
    mask = _shared_qk_mask(1, 12, True) & pad[0]
    want = reference.attention(keys_q[:, :, -1:], F.normalize(keys_q, dim=-1), v, mask)
    assert (out - want).abs().max() <= 1e-5


def test_eval_is_deterministic_and_training_is_random():
    q, v = _inputs(1, 2, 200, 16)
    kernel = _kernel(16, seed=3)
    torch.testing.assert_close(kernel(q, q, v), kernel(q, q, v), rtol=0, atol=0)
    assert torch.equal(kernel.hash(q), _kernel(16, seed=3).hash(q))
    assert not torch.equal(kernel.hash(q), _kernel(16, seed=4).hash(q))
    kernel.train()
    assert not torch.equal(kernel.hash(q), kernel.hash(q))
    assert not torch.equal(kernel(q, q, v), kernel(q, q, v))
    # Training draws from the global generator, so replaying its state (activation
    # checkpointing, reversible blocks) replays the buckets.
    torch.manual_seed(7)
    first = kernel(q, q, v)
    torch.manual_seed(7)
    torch.testing.assert_close(kernel(q, q, v), first, rtol=0, atol=0)


def test_buckets_shape_and_auto_count():
    kernel = _kernel(64, rounds=3)
    q, _ = _inputs(2, 2, 300, 16)
    buckets = kernel.hash(q)
    assert buckets.shape == (3, 2, 2, 300) and buckets.dtype == torch.long
    assert buckets.min() >= 0 and buckets.max() < kernel.n_buckets(300)
    assert [kernel.n_buckets(t) for t in (1, 97, 300, 16384)] == [2, 4, 10, 512]
    assert _kernel(64, buckets=6).n_buckets(16384) == 6


def test_registered_with_shared_qk():
    assert ATTENTION["lsh"] is LSHAttention and LSHAttention.shared_qk
    settings = {"lsh_chunk": 32, "lsh_buckets": 8, "lsh_rounds": 3, "lsh_seed": 5, "window": 9}
    kernel = build_attention("lsh", settings)  # a pool: window is not an lsh setting
    assert (kernel.chunk, kernel.buckets, kernel.rounds, kernel.seed) == (32, 8, 3, 5)
    # The reference's default self score is the kernel's.
    assert lsh_reference.__kwdefaults__["self_score"] == SELF_SCORE


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lsh_chunk": 0}, "lsh_chunk"),
        ({"lsh_chunk": -4}, "lsh_chunk"),
        ({"lsh_rounds": 0}, "lsh_rounds"),
        ({"lsh_buckets": 3}, "lsh_buckets"),
        ({"lsh_buckets": -2}, "lsh_buckets"),
        ({"lsh_chunk": 2.5}, "lsh_chunk"),
    ],
)
def test_bad_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        LSHAttention(**settings)


def test_bad_inputs_raise():
    kernel = _kernel(8)
    q, v = _inputs(1, 2, 10, 8)
    with pytest.raises(ValueError, match="last Tq"):
        kernel(q, q[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match="key_padding"):
        kernel(q, q, v, key_padding=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected q"):
        kernel(q[0], q[0], v[0])


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    t=st.integers(1, 70),
    d=st.sampled_from([4, 8, 16]),
    chunk=st.integers(1, 24),
    rounds=st.integers(1, 3),
    buckets=st.sampled_from([0, 2, 4, 6]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(b, h, t, d, chunk, rounds, buckets, causal, seed):
    kernel = _kernel(chunk, rounds, buckets, seed=seed)
    q, v = _inputs(b, h, t, d, seed=seed, grad=True)
    out = kernel(q, q, v, causal=causal)
    ref = lsh_reference(q, v, kernel.hash(q), chunk=chunk, causal=causal)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 1e-5
    got = torch.autograd.grad(out.sum(), q)[0]
    want = torch.autograd.grad(ref.sum(), q)[0]
    assert (got - want).abs().max() <= 1e-4


def test_model_forward_backward_and_cached_generation():
    cfg = Config.preset("tiny").model
    cfg = dataclasses.replace(
        cfg,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=64,
        attention="lsh",
        lsh_chunk=8,
        memory="none",
    )
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    assert logits.shape == (2, 37, cfg.vocab_size) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for p in model.parameters()
        if p.requires_grad
    )
    model.eval()
    prompt = tokens[0, :11].tolist()
    first = list(generate_ids(model, prompt, 6, temperature=0))
    assert len(first) == 6 and all(0 <= i < cfg.vocab_size for i in first)
    assert list(generate_ids(model, prompt, 6, temperature=0)) == first  # eval is deterministic
    # The prefill's last position is computed by LSH over the prompt, like a full forward.
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0][0, -1]
    assert int(full.argmax()) == first[0]
    assert math.isfinite(float(full.sum()))


def test_reversible_recompute_replays_training_rotations():
    # Reversible blocks recompute attention in backward; the RNG replay must redraw the same
    # rotations, or the gradients would belong to different buckets.
    cfg = dataclasses.replace(
        Config.preset("tiny").model,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=64,
        memory="none",
        attention="lsh",
        lsh_chunk=8,
        reversible=True,
    )
    tokens = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (True, False):
        model = build_model(cfg, seed=0)
        model.reversible_backward = recompute
        torch.manual_seed(3)
        model(tokens)[0].logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
