"""Rotary scaling rules (``memext.nn.rope_scaling``): their defining properties, agreement with
transformers' own rope init functions, the config's checks, and a scaled model that trains."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memext import build_model
from memext.config import Config, ModelConfig
from memext.nn.rope_scaling import (
    ROPE_SCALING,
    hf_rope_parameters,
    register_rope_scaling,
    rope_frequencies,
    unscaled_inv_freq,
)
from memext.nn.rotary import Rotary

HEAD_DIM, BASE, ORIGINAL = 16, 10000.0, 64


# --- defining properties ----------------------------------------------------------------------
def test_no_scaling_is_bit_identical_to_plain_rope() -> None:
    # The formula Rotary used before scaling existed, kept here as the reference.
    inv_freq = 1.0 / BASE ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    freqs = torch.arange(300).float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = Rotary(HEAD_DIM, BASE)(torch.arange(300))
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())


@pytest.mark.parametrize("name", sorted(ROPE_SCALING))
def test_factor_one_equals_no_scaling(name: str) -> None:
    plain = Rotary(HEAD_DIM, BASE)
    scaled = Rotary(HEAD_DIM, BASE, scaling=name, factor=1.0, original_len=ORIGINAL)
    positions = torch.arange(ORIGINAL)
    # dynamic NTK stretches by s·n/L - (s-1) = n/L above L even at s = 1: compare up to L only.
    for got, want in zip(scaled(positions, seq_len=ORIGINAL), plain(positions), strict=True):
        assert torch.equal(got, want), name
    if name != "dynamic":
        longer = torch.arange(4 * ORIGINAL)
        for got, want in zip(scaled(longer), plain(longer), strict=True):
            assert torch.equal(got, want), name


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0, 3.0])
def test_linear_reads_position_p_as_p_over_factor(factor: float) -> None:
    scaled = Rotary(HEAD_DIM, BASE, scaling="linear", factor=factor, original_len=ORIGINAL)
    positions = torch.arange(int(factor * ORIGINAL))
    got = scaled(positions)
    want = Rotary(HEAD_DIM, BASE)(positions.double() / factor)
    # Powers of two divide exactly, so the two products round identically.
    tol = 0.0 if factor in (2.0, 4.0, 8.0) else 1e-5
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0.0, atol=tol)


def test_dynamic_is_plain_up_to_the_original_length_and_stretches_above() -> None:
    rot = Rotary(HEAD_DIM, BASE, scaling="dynamic", factor=4.0, original_len=ORIGINAL)
    plain = Rotary(HEAD_DIM, BASE)
    for n in (1, ORIGINAL // 2, ORIGINAL):
        positions = torch.arange(n)
        for got, want in zip(rot(positions, seq_len=n), plain(positions), strict=True):
            assert torch.equal(got, want)
    assert rot._long_inv_freq is None  # nothing recomputed at or below the original length
    lower = rot.frequencies(2 * ORIGINAL)
    assert torch.all(lower[1:] < plain.inv_freq[1:]) and lower[0] == plain.inv_freq[0]
    assert torch.all(rot.frequencies(4 * ORIGINAL)[1:] < lower[1:])  # longer reads stretch more
    # seq_len defaults to the last position + 1, and the same length reuses the cached tensor.
    cached = rot.frequencies(3 * ORIGINAL)
    assert rot.frequencies(3 * ORIGINAL) is cached
    positions = torch.arange(3 * ORIGINAL - 5, 3 * ORIGINAL)
    for got, want in zip(rot(positions), rot(positions, seq_len=3 * ORIGINAL), strict=True):
        assert torch.equal(got, want)


def test_yarn_scales_cos_and_sin_by_its_temperature() -> None:
    rot = Rotary(HEAD_DIM, BASE, scaling="yarn", factor=8.0, original_len=ORIGINAL)
    cos, sin = rot(torch.arange(100))
    expected = 0.1 * torch.log(torch.tensor(8.0)).item() + 1.0
    assert rot.attention_factor == pytest.approx(expected)
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, expected**2))


@settings(max_examples=60, deadline=None)
@given(
    half_dim=st.integers(2, 128),
    factor=st.floats(1.0, 64.0),
    original_len=st.integers(16, 1 << 17),
    base=st.sampled_from([10000.0, 500000.0]),
)
def test_rules_keep_their_defining_properties(
    half_dim: int, factor: float, original_len: int, base: float
) -> None:
    d = 2 * half_dim
    plain = unscaled_inv_freq(d, base)
    args = {"factor": factor, "original_len": original_len}

    linear, af = rope_frequencies("linear", d, base, **args)
    torch.testing.assert_close(linear, plain / factor, rtol=1e-12, atol=0.0)
    assert af == 1.0

    yarn, temperature = rope_frequencies("yarn", d, base, **args)
    lo, hi = torch.minimum(linear, plain), torch.maximum(linear, plain)
    assert torch.all(yarn >= lo * (1 - 1e-12)) and torch.all(yarn <= hi * (1 + 1e-12))
    assert temperature >= 1.0

    ntk, _ = rope_frequencies("ntk", d, base, **args)
    assert ntk[0] == 1.0  # the highest frequency stays ...
    torch.testing.assert_close(ntk[-1], plain[-1] / factor, rtol=1e-9, atol=0.0)  # lowest / s
    assert torch.all(ntk <= plain * (1 + 1e-12))

    short, _ = rope_frequencies("dynamic", d, base, seq_len=original_len, **args)
    assert torch.equal(short, plain)
    long, _ = rope_frequencies("dynamic", d, base, seq_len=3 * original_len, **args)
    assert torch.all(long <= plain * (1 + 1e-12)) and torch.all(torch.isfinite(long))


# --- transformers as the independent reference ------------------------------------------------
def _transformers():
    import transformers  # >= 5 (rope_parameters), in the dev extra

    return transformers


def _llama_config(rope: dict, max_position_embeddings: int, head_dim: int):
    return _transformers().LlamaConfig(
        vocab_size=264,
        hidden_size=2 * head_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope,
    )


# transformers computes in float32, we in float64: they agree to float32 rounding (~3.5e-7 seen).
RTOL = 1e-6


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("factor", [1.0, 2.0, 4.0, 8.5, 32.0])
@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn"])
def test_frequencies_match_transformers(name: str, factor: float, head_dim: int) -> None:
    _transformers()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = 256 if head_dim < 64 else 4096
    alpha, beta = (2.0, 16.0) if head_dim == 64 else (1.0, 32.0)
    rope = hf_rope_parameters(name, factor, original, alpha, beta, BASE)
    # transformers' dynamic type reads the original length from max_position_embeddings.
    max_pos = original if name == "dynamic" else int(factor * original)
    config = _llama_config(rope, max_pos, head_dim)
    lengths = (
        [None, original // 2, original, original + 1, 3 * original] if name == "dynamic" else [None]
    )
    for n in lengths:
        want, want_factor = ROPE_INIT_FUNCTIONS[name](config, "cpu", seq_len=n)
        got, got_factor = rope_frequencies(
            name,
            head_dim,
            BASE,
            factor=factor,
            original_len=original,
            seq_len=n,
            alpha=alpha,
            beta=beta,
        )
        torch.testing.assert_close(got.float(), want, rtol=RTOL, atol=0.0)
        assert got_factor == pytest.approx(want_factor, rel=1e-12)


def test_ntk_maps_to_transformers_default_rope_with_a_larger_base() -> None:
    _transformers()
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = hf_rope_parameters("ntk", 4.0, 256, base=BASE, head_dim=HEAD_DIM)
    assert rope["rope_type"] == "default" and rope["rope_theta"] > BASE
    config = _llama_config(rope, 1024, HEAD_DIM)
    want = LlamaRotaryEmbedding(config).inv_freq
    got, _ = rope_frequencies("ntk", HEAD_DIM, BASE, factor=4.0, original_len=256)
    torch.testing.assert_close(got.float(), want, rtol=RTOL, atol=0.0)


def test_hf_rope_parameters_write_only_the_keys_transformers_reads() -> None:
    assert hf_rope_parameters("none", 1.0, 0) == {"rope_type": "default", "rope_theta": 10000.0}
    assert set(hf_rope_parameters("linear", 2.0, 64)) == {"rope_type", "rope_theta", "factor"}
    assert hf_rope_parameters("yarn", 2.0, 64, 1.5, 20.0) == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 2.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 20.0,
        "beta_slow": 1.5,
    }
    with pytest.raises(ValueError, match="pass head_dim"):
        hf_rope_parameters("ntk", 2.0, 64)


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_factor": 0.0}, r"model\.rope_factor=0\.0 is invalid: expected a number > 0"),
        ({"rope_factor": -2.0}, r"model\.rope_factor=-2\.0 is invalid"),
        (
            {"rope_scaling": "linear", "rope_original_len": 1024, "max_seq_len": 512},
            r"model\.rope_original_len=1024 .*must not exceed the new one",
        ),
        ({"rope_scaling": "yarn"}, r"model\.rope_original_len=0 .*when rope_scaling='yarn'"),
        ({"rope_scaling": "yarm"}, r"model\.rope_scaling='yarm' .*did you mean 'yarn'\?"),
        ({"rope_scaling": "rope"}, r"one of dynamic, linear, none, ntk, yarn"),
        ({"yarn_alpha": 32.0}, r"model\.yarn_alpha=32\.0 is invalid: expected < yarn_beta=32\.0"),
        ({"rope_original_len": -1}, r"model\.rope_original_len=-1 is invalid"),
    ],
)
def test_config_refuses_bad_rope_settings(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_override_strings_reach_the_rope_fields() -> None:
    cfg = Config().override(
        {
            "model.rope_scaling": "yarn",
            "model.rope_factor": "4",
            "model.rope_original_len": "2048",
            "model.yarn_beta": "16",
        }
    )
    assert (cfg.model.rope_scaling, cfg.model.rope_factor, cfg.model.yarn_beta) == (
        "yarn",
        4.0,
        16.0,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scaling": "linear", "factor": 0.0, "original_len": 8}, r"factor=0\.0 is invalid"),
        ({"scaling": "linear", "factor": 2.0}, r"original_len=0 .*when rope_scaling='linear'"),
        ({"scaling": "dynamc", "original_len": 8}, r"did you mean 'dynamic'\?"),
        ({"scaling": "yarn", "original_len": 8, "alpha": 4.0, "beta": 2.0}, r"0 < alpha < beta"),
    ],
)
def test_rotary_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rotary(HEAD_DIM, BASE, **kwargs)


def test_a_rule_registers_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_rope_scaling("linear")(lambda *a, **k: None)


# --- a scaled model ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "ntk", "dynamic", "yarn"])
def test_scaled_model_runs_forward_and_backward(tiny_model_cfg: ModelConfig, name: str) -> None:
    cfg = dataclasses.replace(
        tiny_model_cfg, max_seq_len=128, rope_scaling=name, rope_factor=2.0, rope_original_len=64
    )
    model = build_model(cfg, seed=0)
    assert model.rotary.scaling == name
    tokens = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 264), tokens[:, 1:].flatten()
    )
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    plain, _ = build_model(dataclasses.replace(cfg, rope_scaling="none"), seed=0)(tokens)
    assert not torch.allclose(logits, plain)  # the scaling does reach the attention
