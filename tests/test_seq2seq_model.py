"""The encoder-decoder against its naive twin (``reference.seq2seq_reference``), forward and
backward, for every encoder kernel; cached greedy decoding against recomputation; the builder's
and the config's refusals.

Tolerances (fp32): outputs within 1e-5 absolute of the reference (the kernels and the reference
differ only in summation order; observed ~1e-6 on logits of magnitude ~1), gradients within
1e-4 relative to the largest gradient of the tensor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memext.config import ModelConfig
from memext.infer.seq2seq import greedy_decode
from memext.model import build_model
from memext.nn.attention import ATTENTION
from memext.nn.reference import (
    attention,
    block_sparse_mask,
    chunked_mask,
    lsh_reference,
    seq2seq_reference,
    sliding_mask,
)
from memext.nn.seq2seq import EncoderDecoder

BASE = ModelConfig(
    arch="seq2seq",
    vocab_size=264,
    d_model=32,
    n_layers=2,
    encoder_layers=2,
    n_heads=2,
    max_seq_len=512,
    max_target_len=32,
    window=8,
    global_tokens=3,
    block_size=4,
    random_blocks=1,
    lsh_chunk=8,
    init_std=0.2,  # larger than training's 0.02, so that a wrong mask moves the logits
)
FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def _model(attention: str, **changes) -> EncoderDecoder:
    cfg = dataclasses.replace(BASE, attention=attention, **changes)
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():  # untrained norms are all 1: perturb them so a swapped one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model


def _twin(model: EncoderDecoder, name: str):
    """The encoder kernel's naive twin on (B, H, G + S, D)."""
    kernel = model.encoder[0].attn.kernel

    def twin(q, k, v):
        t = q.shape[-2]
        if name == "full":
            return attention(q, k, v)
        if name == "sliding":
            mask = sliding_mask(
                t, t, kernel.window, causal=False, global_tokens=kernel.global_tokens
            )
            return attention(q, k, v, mask)
        if name == "block_sparse":
            mask = block_sparse_mask(
                t,
                t,
                block_size=kernel.block_size,
                window=kernel.window,
                global_tokens=kernel.global_tokens,
                causal=False,
                random_blocks=kernel.random_table(kernel.n_blocks(t), False).tolist(),
            )
            return attention(q, k, v, mask)
        if name == "chunked":
            return attention(q, k, v, chunked_mask(t, t, kernel.window, causal=False))
        if name == "lsh":
            return lsh_reference(q, v, kernel.hash(q), chunk=kernel.chunk, causal=False)
        raise AssertionError(f"no twin for {name}")

    return twin


def _data(b: int, s: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s), generator=gen), torch.randint(
        0, 256, (b, t), generator=gen
    )


def test_every_kernel_has_a_twin_here() -> None:
    # A new bidirectional kernel must be added to _twin, or this fails.
    assert {n for n in ATTENTION if ATTENTION[n].bidirectional} == {
        "full",
        "sliding",
        "block_sparse",
        "chunked",
        "lsh",
    }


@pytest.mark.parametrize("name", sorted(n for n in ATTENTION if ATTENTION[n].bidirectional))
@pytest.mark.parametrize("s", [37, 64], ids=["S37", "S64"])
def test_forward_equals_reference(name: str, s: int) -> None:
    model = _model(name)
    src, tgt = _data(2, s, 11)
    with torch.no_grad():
        got, _ = model(src, tgt)
        want = seq2seq_reference(model, src, tgt, _twin(model, name))
    assert (got - want).abs().max().item() <= FWD_TOL
    # The check can fail: the dense encoder differs from every sparse pattern at this length.
    if name != "full":
        with torch.no_grad():
            dense = seq2seq_reference(model, src, tgt, None)
        assert (dense - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["full", "sliding", "block_sparse", "chunked"])
def test_backward_equals_reference(name: str) -> None:
    model = _model(name).train()  # no dropout configured: train() changes nothing but the mode
    src, tgt = _data(2, 45, 9, seed=3)
    targets = torch.randint(0, 256, tgt.shape, generator=torch.Generator().manual_seed(4))

    def grads(fn) -> dict[str, torch.Tensor]:
        model.zero_grad()
        logits = fn()
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.ravel()
        ).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    got = grads(lambda: model(src, tgt)[0])
    want = grads(lambda: seq2seq_reference(model, src, tgt, _twin(model, name)))
    assert got.keys() == want.keys()
    for n in got:
        scale = want[n].abs().max().item()
        assert scale > 0, n  # every parameter gets a gradient, global slots included
        assert (got[n] - want[n]).abs().max().item() <= GRAD_TOL * scale, n


def test_sliding_encoder_sees_far_tokens_only_through_global_slots() -> None:
    """With a window of 8 (4 each side) and two layers, changing source token 0 reaches the last
    of 60 encoder states only through the global slots (layer 1 writes it into them, layer 2
    reads it): with slots it does, without them it cannot."""
    src, _ = _data(1, 60, 1)
    other = src.clone()
    other[0, 0] = (src[0, 0] + 1) % 256
    for g, moves in ((3, True), (0, False)):
        model = _model("sliding", global_tokens=g)
        with torch.no_grad():
            a, b = model.encode(src)[0, -1], model.encode(other)[0, -1]
        assert ((a - b).abs().max().item() > 1e-6) is moves


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(["full", "sliding", "block_sparse", "chunked"]),
    b=st.integers(1, 3),
    s=st.integers(1, 70),
    t=st.integers(1, 12),
    window=st.sampled_from([2, 5, 8, 16]),
    g=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_forward_equals_reference_over_shapes(name, b, s, t, window, g, seed) -> None:
    model = _model(name, window=window, global_tokens=g)
    src, tgt = _data(b, s, t, seed)
    with torch.no_grad():
        got, _ = model(src, tgt)
        want = seq2seq_reference(model, src, tgt, _twin(model, name))
    assert (got - want).abs().max().item() <= FWD_TOL


@settings(max_examples=10, deadline=None)
@given(
    name=st.sampled_from(["full", "sliding", "block_sparse", "lsh"]),
    b=st.integers(1, 3),
    s=st.integers(2, 60),
    seed=st.integers(0, 2**16),
)
def test_cached_greedy_equals_recompute(name, b, s, seed) -> None:
    model = _model(name)
    src, _ = _data(b, s, 1, seed)
    # eos=-1 is never an argmax: every row decodes all 20 steps, so all of them are compared.
    cached = greedy_decode(model, src, bos=256, eos=-1, max_new_tokens=20)
    recomputed = greedy_decode(model, src, bos=256, eos=-1, max_new_tokens=20, cache=None)
    assert cached == recomputed
    assert all(len(row) == 20 for row in cached)
    # And with a real end token, decoding stops at it in both paths alike.
    assert greedy_decode(model, src, 256, 257, 20) == greedy_decode(model, src, 256, 257, 20, None)


def test_cached_logits_equal_one_pass() -> None:
    """Feeding the target one token at a time through the caches (self and cross) gives the
    logits of one pass over the whole target."""
    from memext.infer.seq2seq import decoder_state

    model = _model("sliding")
    src, tgt = _data(2, 50, 10, seed=7)
    with torch.no_grad():
        whole, _ = model(src, tgt)
        state = decoder_state(model, 2)
        steps = []
        for i in range(tgt.shape[1]):
            logits, state = model(src if i == 0 else None, tgt[:, i : i + 1], state)
            steps.append(logits)
    assert state.pos == 10 and state.cache.seq_len == 10
    assert (torch.cat(steps, dim=1) - whole).abs().max().item() <= FWD_TOL


def test_limits_are_refused_with_their_names() -> None:
    model = _model("full")
    src, tgt = _data(1, 10, 40)
    with pytest.raises(ValueError, match="max_target_len=32"):
        model(src, tgt)
    with pytest.raises(ValueError, match="source is empty"):
        model(src[:, :0], tgt[:, :3])
    with pytest.raises(ValueError, match="max_seq_len=512"):
        model(torch.zeros(1, 513, dtype=torch.long), tgt[:, :3])
    with pytest.raises(ValueError, match="max_target_len=32 holds"):
        greedy_decode(model, src, 256, 257, max_new_tokens=32)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"memory": "knn"}, "model.memory='knn'"),
        ({"reversible": True}, "model.reversible=True"),
        ({"max_target_len": 1}, "model.max_target_len=1"),
        ({"encoder_layers": -1}, "model.encoder_layers=-1"),
    ],
)
def test_config_refuses(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **change)


def test_config_refuses_a_causal_only_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ATTENTION["lsh"], "bidirectional", False)
    with pytest.raises(ValueError, match=r"model.attention='lsh'.*full.*sliding"):
        dataclasses.replace(BASE, attention="lsh")
