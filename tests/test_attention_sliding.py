"""Sliding-window attention equals its dense-mask reference, forward and backward, at awkward sizes.

Tolerances (fp32): forward max abs error <= 1e-5, gradients <= 1e-4. bf16 (`bf16_rule`): the
kernel's norm-wise error against an fp64 reference is at most twice the bf16 reference's own
error against fp64, forward and backward.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bf16_rule import assert_within_reference_error
from memext.model import build_model
from memext.nn.attention import build_attention
from memext.nn.reference import attention, causal_mask, sliding_mask

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def _qkv(b: int, h: int, t: int, d: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]


def _compare(kernel, q, k, v, mask, causal: bool) -> tuple[float, float]:
    """(forward error, worst gradient error) of kernel vs reference on the same inputs."""
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    qb, kb, vb = (x.clone().requires_grad_() for x in (q, k, v))
    out = kernel(qa, ka, va, causal=causal)
    ref = attention(qb, kb, vb, mask)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    fwd = (out - ref).abs().max().item()
    grads = max((a.grad - b.grad).abs().max().item() for a, b in ((qa, qb), (ka, kb), (va, vb)))
    return fwd, grads


CASES = [
    # (T, head_dim, window, dilation, global_tokens, block): small blocks reach the middle path
    (1, 32, 4, 1, 0, 0),
    (97, 32, 16, 1, 0, 8),
    (97, 64, 16, 1, 3, 8),
    (97, 32, 5, 2, 0, 8),
    (1025, 32, 64, 1, 0, 16),
    (1025, 64, 64, 1, 2, 0),
    (1025, 32, 33, 3, 0, 0),
]


# Bidirectional dilation needs T divisible by it (otherwise refused: tested below).
GRID = [(c, causal) for c in CASES for causal in (True, False) if causal or c[0] % c[3] == 0]


@pytest.mark.parametrize(
    "case,causal",
    GRID,
    ids=["T{}-D{}-W{}-d{}-g{}-b{}".format(*c) + ("-causal" if k else "-bidir") for c, k in GRID],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu", "portable"])
def test_sliding_equals_reference(case, causal: bool, fused: bool) -> None:
    t, d, w, dil, g, blk = case
    kernel = build_attention("sliding", window=w, dilation=dil, global_tokens=g, block=blk)
    kernel.fused_cpu = fused
    q, k, v = _qkv(2, 3, t, d)
    mask = sliding_mask(t, t, w, causal=causal, dilation=dil, global_tokens=g)
    fwd, grads = _compare(kernel, q, k, v, mask, causal)
    assert fwd <= FWD_TOL
    assert grads <= GRAD_TOL


# flash-attention's 2x rule, norm-wise for the gradients too: PyTorch's CPU flash kernel rounds
# the probabilities and dS to bf16 before the dK/dV products, which moves the element-wise ratio
# from seed to seed (up to 1.5x here, 3.0x in test_model.py) but not the norm-wise one.
BF16_K = 2.0


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_bf16_error_within_twice_the_references(causal: bool) -> None:
    t, w = 515, 64
    kernel = build_attention("sliding", window=w, block=16)
    q, k, v = _qkv(1, 2, t, 32, torch.float64)
    mask = sliding_mask(t, t, w, causal=causal)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def run(fn, dtype):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        out.backward(grad.to(dtype))
        return [out.double(), *(x.grad.double() for x in xs)]

    exact = run(lambda *x: attention(*x, mask), torch.float64)
    low = run(lambda *x: attention(*x, mask), torch.bfloat16)
    fast = run(lambda *x: kernel(*x, causal=causal), torch.bfloat16)
    for name, f, lo, e in zip(["out", "dq", "dk", "dv"], fast, low, exact, strict=True):
        assert_within_reference_error(name, f, lo, e, BF16_K)


def test_window_covering_the_sequence_is_full_attention() -> None:
    t = 200
    q, k, v = _qkv(2, 2, t, 32)
    causal = build_attention("sliding", window=t, block=16)(q, k, v, causal=True)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (causal - full).abs().max().item() <= FWD_TOL
    both = build_attention("sliding", window=2 * t, block=16)(q, k, v, causal=False)
    assert (both - torch.nn.functional.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "tq,dil,g", [c for c in itertools.product([1, 5], [1, 2], [0, 3]) if c[1] == 1 or not c[2]]
)
def test_cached_queries_see_what_the_reference_says(tq: int, dil: int, g: int) -> None:
    t, w = 101, 16
    q, k, v = _qkv(1, 2, t, 32)
    kernel = build_attention("sliding", window=w, dilation=dil, global_tokens=g)
    out = kernel(q[:, :, -tq:], k, v)
    ref = attention(q[:, :, -tq:], k, v, sliding_mask(tq, t, w, dilation=dil, global_tokens=g))
    assert (out - ref).abs().max().item() <= FWD_TOL


@settings(max_examples=15, deadline=None)
@given(
    t=st.integers(1, 300),
    w=st.integers(1, 80),
    dil=st.integers(1, 3),
    g=st.integers(0, 4),
    blk=st.sampled_from([0, 8, 16]),
    causal=st.booleans(),
)
def test_sliding_matches_reference_on_random_shapes(t, w, dil, g, blk, causal) -> None:
    if dil > 1:
        g = 0
    if not causal and t % dil:
        t = max(dil, t - t % dil)
    kernel = build_attention("sliding", window=w, dilation=dil, global_tokens=g, block=blk)
    q, k, v = _qkv(1, 2, t, 16, seed=t)
    mask = sliding_mask(t, t, w, causal=causal, dilation=dil, global_tokens=g)
    out = kernel(q, k, v, causal=causal)
    assert (out - attention(q, k, v, mask)).abs().max().item() <= FWD_TOL


def test_reference_mask_semantics() -> None:
    m = sliding_mask(6, 6, 3)  # causal: i-2 .. i
    assert m[5].tolist() == [False, False, False, True, True, True]
    m = sliding_mask(7, 7, 4, causal=False)  # |i - j| <= 2
    assert m[3].tolist() == [False, True, True, True, True, True, False]
    m = sliding_mask(7, 7, 2, dilation=2)  # i, i-2
    assert m[6].tolist() == [False, False, False, False, True, False, True]
    m = sliding_mask(6, 6, 1, global_tokens=2)
    assert m[5].tolist() == [True, True, False, False, False, True]
    assert m[0].tolist() == [True, False, False, False, False, False]  # globals stay causal
    m = sliding_mask(6, 6, 2, causal=False, global_tokens=1)
    assert m[0].all() and m[:, 0].all()
    assert torch.equal(sliding_mask(5, 5, 5), causal_mask(5, 5))


@pytest.mark.parametrize(
    "settings_, match",
    [
        ({"window": 0}, "window"),
        ({"window": 8, "dilation": 0}, "dilation"),
        ({"window": 8, "global_tokens": -1}, "global_tokens"),
        ({"window": 8, "dilation": 2, "global_tokens": 1}, "dilation"),
    ],
)
def test_bad_settings_are_refused(settings_, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_attention("sliding", **settings_)


def test_bad_inputs_are_refused() -> None:
    q, k, v = _qkv(1, 1, 9, 8)
    kernel = build_attention("sliding", window=4, dilation=2)
    with pytest.raises(ValueError, match="divisible"):
        kernel(q, k, v, causal=False)
    with pytest.raises(ValueError, match="key_padding"):
        kernel(q, k, v, key_padding=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected q"):
        kernel(q, k[..., :4], v)


def test_sliding_model_cached_decode_equals_recompute(tiny_model_cfg) -> None:
    cfg = dataclasses.replace(tiny_model_cfg, attention="sliding", window=8, init_std=0.2)
    model = build_model(cfg, seed=0).eval()
    from memext.infer.generate import new_state

    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)[0]
        state = new_state(model, 1, 40)
        logits, state = model(tokens[:, :25], state)
        steps = [logits]
        for i in range(25, 40):
            logits, state = model(tokens[:, i : i + 1], state)
            steps.append(logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_one_kernel_serves_many_lengths_and_keeps_few_plans() -> None:
    kernel = build_attention("sliding", window=16, block=8)
    for t in [97, 40, 97, 200, *range(10, 30), 97]:
        q, k, v = _qkv(1, 2, t, 16, seed=t)
        ref = attention(q, k, v, sliding_mask(t, t, 16))
        assert (kernel(q, k, v) - ref).abs().max().item() <= FWD_TOL
    assert len(kernel._plans) <= 8
