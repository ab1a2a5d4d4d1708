"""The model and its attention kernel: causality, every preset trains, overfitting, and the
fast kernel against the naive reference (fp32 bounds and flash-attention's bf16 rule)."""

from __future__ import annotations

import dataclasses
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bf16_rule import assert_within_reference_error
from memext import Config, build_model
from memext.config import ModelConfig
from memext.nn import reference
from memext.nn.attention import ATTENTION, build_attention, register_attention
from memext.nn.rotary import Rotary, apply_rotary
from memext.presets import PRESETS


# --- the model --------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", [0, 17, 63])
def test_changing_a_future_token_never_changes_earlier_logits(tiny_model_cfg, pos: int) -> None:
    model = build_model(tiny_model_cfg, seed=0).eval()
    gen = torch.Generator().manual_seed(pos)
    tokens = torch.randint(0, 256, (2, 64), generator=gen)
    changed = tokens.clone()
    changed[:, pos] = (changed[:, pos] + 1) % 256
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    if pos:
        assert (a[:, :pos] - b[:, :pos]).abs().max().item() <= 1e-6
    # ... while the changed position and everything after it does see the change.
    assert (a[:, pos:] - b[:, pos:]).abs().amax(dim=-1).min().item() > 1e-4


def test_rejects_sequences_longer_than_max_seq_len(tiny_model_cfg) -> None:
    model = build_model(dataclasses.replace(tiny_model_cfg, max_seq_len=16))
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's limit max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_seed_makes_init_reproducible(tiny_model_cfg) -> None:
    a, b = build_model(tiny_model_cfg, seed=1), build_model(tiny_model_cfg, seed=1)
    c = build_model(tiny_model_cfg, seed=2)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.dim() >= 2:
            assert not torch.equal(pa, pc), name
    assert a.head.weight is a.embed.weight  # tied by default


# Parameter counts (without the embedding) pin the architecture each preset promises.
PRESET_PARAMS = {
    "tiny": 106_820,
    "small": 10_621_824,
    "base": 84_953_856,
    "seq2seq-tiny": 246_784,
    "seq2seq-digest": 246_784,
    "seq2seq-cipher": 246_784,
    "seq2seq-outline": 246_784,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_trains_one_step(name: str) -> None:
    assert name in PRESET_PARAMS, f"add preset {name!r}'s parameter count to PRESET_PARAMS"
    cfg = Config.preset(name)
    model = build_model(cfg.model, seed=0)
    assert model.num_params() == PRESET_PARAMS[name]
    # The architecture is the preset's; only the batch is shrunk (1 sequence of 32 tokens).
    tokens = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = tokens[:, 1:]
    if cfg.model.arch == "seq2seq":  # 16 source tokens, a target of 16
        logits, state = model(tokens[:, :16], tokens[:, 16:-1])
        targets = tokens[:, 17:]
    elif cfg.train.segment_len:  # two segments, so a memory read (and its gate) is used
        first, state = model(tokens[:, :16])
        second, state = model(tokens[:, 16:-1], state)
        logits = torch.cat([first, second], dim=1)
    else:
        logits, state = model(tokens[:, :-1])
    assert logits.shape == (1, targets.shape[1], cfg.model.vocab_size)
    assert state.pos == targets.shape[1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    # Small init: the first loss is close to a uniform guess over the vocabulary.
    assert abs(loss.item() - math.log(cfg.model.vocab_size)) < 0.5
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not move"


# Seed 0 gets below 0.05 in 93 steps on torch 2.13 CPU (seeds 0-5: 58-130 steps).
OVERFIT_STEPS = 200


def test_overfits_a_single_batch() -> None:
    model = build_model(Config.preset("tiny").model, seed=0)  # the tiny preset's architecture
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py").read_bytes()
    seg = torch.tensor(list(text[: 2 * 65]), dtype=torch.long).view(2, 65)
    x, y = seg[:, :-1], seg[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(OVERFIT_STEPS):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        losses.append(loss.item())
        if losses[-1] < 0.05:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.05, f"loss {losses[-1]:.3f} after {OVERFIT_STEPS} steps"
    assert losses[0] > 5.0


# --- rotary -----------------------------------------------------------------------------------
def test_rotary_scores_depend_only_on_relative_position() -> None:
    rot = Rotary(16)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=gen), torch.randn(1, 1, 1, 16, generator=gen)

    def score(i: int, j: int) -> float:
        cos, sin = rot(torch.tensor([i, j]))
        qi = apply_rotary(q, cos[:1], sin[:1])
        kj = apply_rotary(k, cos[1:], sin[1:])
        return (qi * kj).sum().item()

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    cos, sin = rot(torch.arange(7))
    assert torch.allclose(apply_rotary(q.expand(1, 1, 7, 16), cos, sin).norm(dim=-1), q.norm())


# --- attention kernels ------------------------------------------------------------------------
def test_reference_mask_is_bottom_right_aligned() -> None:
    assert reference.causal_mask(2, 4).tolist() == [
        [True, True, True, False],
        [True, True, True, True],
    ]
    assert torch.equal(reference.causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())


def _qkv(b: int, h: int, tq: int, tk: int, d: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=gen).to(dtype)
    k = torch.randn(b, h, tk, d, generator=gen).to(dtype)
    v = torch.randn(b, h, tk, d, generator=gen).to(dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _fwd_bwd(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), grads


def _kernel(name: str = "full"):
    kernel = build_attention(name)
    return lambda q, k, v: kernel(q, k, v, causal=True)


def _reference(q, k, v):
    return reference.attention(q, k, v, reference.causal_mask(q.shape[-2], k.shape[-2]))


def _check_fp32(b: int, h: int, tq: int, tk: int, d: int, seed: int = 0) -> None:
    q, k, v = _qkv(b, h, tq, tk, d, seed=seed)
    grad_out = torch.randn(b, h, tq, d, generator=torch.Generator().manual_seed(seed + 1))
    out, grads = _fwd_bwd(_kernel(), q, k, v, grad_out)
    ref, ref_grads = _fwd_bwd(_reference, q, k, v, grad_out)
    assert (out - ref).abs().max().item() <= 1e-5
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert (g - rg).abs().max().item() <= 1e-4, f"d{name}"


# (B, H, Tq, Tk, head_dim): awkward lengths, both head dims, batch > 1, and Tq < Tk, the
# bottom-right aligned case that a KV cache (Tq = 1) or chunked prefill (1 < Tq < Tk) produces.
SHAPES = {
    "T=1": (1, 1, 1, 1, 32),
    "T=97 batch": (2, 2, 97, 97, 64),
    "T=1025": (1, 2, 1025, 1025, 32),
    "T=1025 d64": (1, 1, 1025, 1025, 64),
    "decode Tq=1": (2, 2, 1, 97, 64),
    "chunk 33 of 97": (2, 1, 33, 97, 32),
    "chunk 97 of 1025": (1, 2, 97, 1025, 64),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_full_attention_matches_reference_fp32(shape) -> None:
    _check_fp32(*shape)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    tq=st.integers(1, 48),
    extra=st.integers(0, 48),
    d=st.sampled_from([8, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_full_attention_matches_reference_random_shapes(b, h, tq, extra, d, seed) -> None:
    _check_fp32(b, h, tq, tq + extra, d, seed)


def test_non_causal_attention_matches_unmasked_reference() -> None:
    q, k, v = _qkv(2, 2, 13, 29, 32)
    out = build_attention("full")(q, k, v, causal=False)
    assert (out - reference.attention(q, k, v)).abs().max().item() <= 1e-5


# bf16: flash-attention's rule, norm-wise (`bf16_rule`): the fast path may be off from the fp32
# truth by at most twice what the naive reference loses by running in bf16, forward and
# backward. PyTorch's CPU flash kernel rounds the probabilities and dS to bf16 before the dK/dV
# products, so its element-wise gradient error reached 3.0x the reference's (dV, torch 2.13,
# AVX512_BF16 CPU) where the norm-wise one stayed <= 1.17x (40 seeds and shapes).
BF16_K = 2.0

BF16_SHAPES = {
    "square T=97": (2, 2, 97, 97, 64),
    "square T=256": (1, 2, 256, 256, 32),
    "chunk 33 of 97": (1, 2, 33, 97, 32),
    "decode Tq=1": (2, 1, 1, 97, 64),
}


@pytest.mark.parametrize("shape", BF16_SHAPES.values(), ids=BF16_SHAPES.keys())
def test_full_attention_bf16_within_twice_reference_error(shape) -> None:
    # flash-attention's rule: the fast path in bf16 may be off from the fp32 truth by at most
    # twice what the naive reference itself loses by running in bf16.
    b, h, tq, tk, d = shape
    q, k, v = _qkv(b, h, tq, tk, d, dtype=torch.bfloat16, seed=3)
    grad_out = torch.randn(b, h, tq, d, generator=torch.Generator().manual_seed(4)).bfloat16()
    out, grads = _fwd_bwd(_kernel(), q, k, v, grad_out)
    low, low_grads = _fwd_bwd(_reference, q, k, v, grad_out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    truth, true_grads = _fwd_bwd(_reference, q32, k32, v32, grad_out.float())

    assert_within_reference_error("out", out, low, truth, BF16_K)
    for name, g, lg, tg in zip("qkv", grads, low_grads, true_grads, strict=True):
        assert_within_reference_error(f"d{name}", g, lg, tg, BF16_K)


def test_attention_registry() -> None:
    before = dict(ATTENTION)
    assert {"full", "sliding", "lsh", "block_sparse"} <= set(ATTENTION)
    with pytest.raises(ValueError, match="unknown attention 'nope'"):
        build_attention("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_attention("full")(type("Dup", (ATTENTION["full"],), {}))
    assert before == ATTENTION  # the failed registration left the registry alone


def test_build_attention_takes_from_a_config_only_the_settings_a_kernel_names() -> None:
    kernel = build_attention("sliding", {"window": 7, "lsh_chunk": 3, "d_model": 999})
    assert kernel.window == 7 and not hasattr(kernel, "lsh_chunk")
    assert build_attention("sliding", {"window": 7}, window=9).window == 9  # explicit wins
    with pytest.raises(ValueError, match="attention 'sliding' takes no setting lsh_chunk"):
        build_attention("sliding", window=7, lsh_chunk=3)  # given on purpose: refused


def test_full_attention_key_padding_hides_padded_keys() -> None:
    q, k, v = _qkv(2, 2, 9, 9, 16)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    for causal in (True, False):
        out = build_attention("full")(q, k, v, causal=causal, key_padding=keep)
        mask = keep[:, None, None, :]
        if causal:
            mask = mask & reference.causal_mask(9, 9)
        assert (out - reference.attention(q, k, v, mask)).abs().max().item() <= 1e-5


def test_model_config_head_dim_and_ffn() -> None:
    cfg = ModelConfig(d_model=96, n_heads=3)
    assert cfg.head_dim == 32
    assert cfg.ffn_hidden == 256  # 8/3 * 96 = 256, a multiple of 64
    assert ModelConfig(d_model=128).ffn_hidden == 384  # 341 rounded up to 64
    assert ModelConfig(d_ff=100).ffn_hidden == 100


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_model_cfg) -> None:
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = build_model(tiny_model_cfg, seed=0).train()
        model.activation_checkpointing = checkpointing
        logits, _ = model(tokens)
        logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-6, msg=name)
