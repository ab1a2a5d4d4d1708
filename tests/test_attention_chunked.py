"""Chunked local attention equals its dense-mask reference, forward and backward.

Tolerances (fp32, inputs drawn in fp64 and rounded): forward max abs error <= 1e-5, gradients
<= 1e-4, as for the other kernels' reference tests.
"""

from __future__ import annotations

import pytest
import torch

from memext.nn.attention import ATTENTION, build_attention
from memext.nn.reference import attention, causal_mask, chunked_mask

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def _qkv(b: int, h: int, tq: int, tk: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=gen, dtype=torch.float64).float()
    k, v = (torch.randn(b, h, tk, d, generator=gen, dtype=torch.float64).float() for _ in "kv")
    return [q, k, v]


def _errors(window: int, q, k, v, causal: bool, key_padding=None) -> tuple[float, float]:
    """(forward error, worst gradient error) of the kernel against the dense reference."""
    kernel = build_attention("chunked", window=window)
    mask = chunked_mask(q.shape[-2], k.shape[-2], window, causal=causal)
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :]
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    out = kernel(*ours, causal=causal, key_padding=key_padding)
    want = attention(*ref, mask)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    fwd = (out - want).abs().max().item()
    grads = max((a.grad - b.grad).abs().max().item() for a, b in zip(ours, ref, strict=True))
    return fwd, grads


# (T, head_dim, window): T a multiple of W, not one, shorter than W, W = 1, one token.
SHAPES = [(64, 16, 16), (97, 32, 16), (10, 16, 32), (13, 8, 1), (1, 16, 4)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-D{d}-W{w}" for t, d, w in SHAPES])
def test_chunked_equals_reference(shape: tuple[int, int, int], causal: bool) -> None:
    t, d, w = shape
    fwd, grads = _errors(w, *_qkv(2, 3, t, t, d), causal)
    assert fwd <= FWD_TOL and grads <= GRAD_TOL


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("tq", [1, 5, 23])
def test_fewer_queries_than_keys_equal_reference(tq: int, causal: bool) -> None:
    # Tk = 50 with W = 16: the queries start inside chunk 1, 2 or 3 (decoding, chunked prefill).
    fwd, grads = _errors(16, *_qkv(2, 2, tq, 50, 16, seed=tq), causal)
    assert fwd <= FWD_TOL and grads <= GRAD_TOL


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("tq", [37, 7])
def test_key_padding_equals_reference(tq: int, causal: bool) -> None:
    q, k, v = _qkv(2, 2, tq, 37, 16, seed=3)
    keep = torch.ones(2, 37, dtype=torch.bool)
    # Row 0 loses keys inside chunks; row 1 its last keys (a right-padded batch). Each chunk
    # keeps its first key, so no query is left with nothing to see (the reference's NaN).
    keep[0, [3, 9, 20, 21, 33]] = False
    keep[1, 33:] = False
    fwd, grads = _errors(8, q, k, v, causal, keep)
    assert fwd <= FWD_TOL and grads <= GRAD_TOL


def test_a_query_with_no_visible_key_gets_zeros() -> None:
    q, k, v = _qkv(1, 2, 24, 24, 8)
    keep = torch.ones(1, 24, dtype=torch.bool)
    keep[0, 8:16] = False  # all of chunk 1
    out = build_attention("chunked", window=8)(q, k, v, causal=True, key_padding=keep)
    assert torch.equal(out[:, :, 8:16], torch.zeros_like(out[:, :, 8:16]))
    assert out[:, :, 16:].abs().min() > 0  # the next chunk is untouched


def test_a_window_covering_the_input_is_full_causal_attention() -> None:
    q, k, v = _qkv(1, 2, 40, 40, 16)
    out = build_attention("chunked", window=64)(q, k, v, causal=True)
    want = attention(q, k, v, causal_mask(40, 40))
    assert (out - want).abs().max().item() <= FWD_TOL


def test_chunk_boundaries_cut_the_context() -> None:
    """The first query of a chunk sees itself alone: its output is its own value."""
    q, k, v = _qkv(1, 1, 24, 24, 8)
    out = build_attention("chunked", window=8)(q, k, v, causal=True)
    for start in (0, 8, 16):
        torch.testing.assert_close(out[0, 0, start], v[0, 0, start])
    # and the check can fail: the second query of a chunk mixes two values
    assert not torch.allclose(out[0, 0, 9], v[0, 0, 9])


def test_registered_and_its_window_checked() -> None:
    assert ATTENTION.lookup("chunked").prefix_exact
    with pytest.raises(ValueError, match=r"chunked: window=0 is invalid: expected an integer > 0"):
        build_attention("chunked", window=0)
