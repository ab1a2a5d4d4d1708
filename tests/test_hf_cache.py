"""memext's cache policies inside Hugging Face Llama: ``PolicyCache`` with ``generate``.

A tiny random Llama (vocab 264, hidden 32, 2 layers, 4 heads, 256 positions, no sliding_window),
built in memory. Tolerances (fp32): logits <= 1e-4 max abs where two routes compute the same
scores (rotations at different absolute angles round differently); greedy tokens identical;
int8 caches: logits within 0.2 of full attention.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import transformers

from memext.hf.cache import PolicyCache, prefill

TOL = 1e-4


def _llama(n_layers: int = 2, **config: Any):
    """A random Llama; ``config`` overrides fields of its ``LlamaConfig``."""
    config = transformers.LlamaConfig(
        **{
            "vocab_size": 264,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": n_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "initializer_range": 0.2,  # peaked logits: greedy choices far from ties
            **config,
        }
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


MODEL = _llama()


def _prompt(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, t), generator=torch.Generator().manual_seed(seed))


def _greedy(model, prompt, n, cache=None):
    kwargs = {"past_key_values": cache} if cache is not None else {}
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, prompt.shape[1] :].tolist()


def test_window_generate_equals_full_while_shorter_than_the_window() -> None:
    prompt = _prompt(10)
    full = _greedy(MODEL, prompt, 40)
    cache = PolicyCache(MODEL.config, "window", window=64)  # 10 + 40 tokens < 64
    assert _greedy(MODEL, prompt, 40, cache) == full
    assert len(set(full)) > 3


def test_full_policy_generates_what_transformers_own_cache_generates() -> None:
    prompt = _prompt(10, seed=2)
    cache = PolicyCache(MODEL.config, "full", max_len=64)
    assert _greedy(MODEL, prompt, 40, cache) == _greedy(MODEL, prompt, 40)
    assert cache.nbytes() == 2 * 2 * 1 * 4 * 64 * 8 * 4  # 2·L·B·H·max_len·D·4 bytes
    with pytest.raises(ValueError, match="the KV cache holds 64 positions; 65 were asked for"):
        _greedy(MODEL, prompt, 60, PolicyCache(MODEL.config, "full", max_len=64))


def test_window_generate_stays_bounded_past_the_window_and_positions() -> None:
    prompt, w = _prompt(20, seed=1), 16
    cache = PolicyCache(MODEL.config, "window", window=w)
    formula = 2 * 2 * 1 * 4 * (w - 1) * 8 * 4  # 2·L·B·H·(w-1)·D·4 bytes
    sizes = []
    for n in (5, 300):  # 300 new tokens: past the window and past max_position_embeddings
        cache = PolicyCache(MODEL.config, "window", window=w)
        out = _greedy(MODEL, prompt, n, cache)
        assert len(out) == n
        sizes.append(cache.nbytes())
        assert cache.get_seq_length() == 20 + n - 1
    assert sizes == [formula, formula]


@pytest.mark.parametrize("chunk", [1, 5, 16, 60])
def test_prefill_applies_the_band_exactly(chunk: int) -> None:
    # One token at a time the band never cuts; in chunks the explicit 4D mask must reproduce it.
    ids = _prompt(60, seed=2)
    step_by_step, _ = prefill(MODEL, ids, PolicyCache(MODEL.config, "window", window=12), 1)
    chunked, cache = prefill(MODEL, ids, PolicyCache(MODEL.config, "window", window=12), chunk)
    assert (chunked - step_by_step).abs().max().item() <= TOL
    assert cache.get_seq_length() == 60


@pytest.mark.parametrize(("s", "w"), [(4, 8), (1, 3)])
def test_sinks_decode_equals_fresh_forward_over_sinks_and_window(s: int, w: int) -> None:
    model = _llama(n_layers=1)  # one layer: cached keys depend on their own token only
    tokens = _prompt(40, seed=3)
    cache = PolicyCache(model.config, "sinks", sinks=s, window=w)
    with torch.no_grad():
        for i in range(40):
            positions = torch.tensor([[i]])
            out = model(tokens[:, i : i + 1], position_ids=positions, past_key_values=cache)
            kept = tokens[:, : min(s, i + 1)]
            recent = tokens[:, max(s, i + 1 - w) : i + 1]
            fresh = model(torch.cat((kept, recent), dim=1)).logits[:, -1]
            assert (out.logits[:, -1] - fresh).abs().max().item() <= TOL, i


@pytest.mark.parametrize(
    "options",
    [
        {"axis": "token", "max_len": 64},
        {"policy": "window", "window": 48, "axis": "channel", "group": 8},
    ],
)
def test_quantized_decoding_stays_close_to_full_attention(options: dict) -> None:
    # This random Llama's greedy margins are often below 0.01, so tokens would test ties, not
    # the cache; the logits are compared instead (observed max error 0.09, logits' std 1.1).
    # Greedy equality is tested on memext's own model (tests/test_cache_policies.py).
    tokens = _prompt(44, seed=5)
    cache = PolicyCache(MODEL.config, "quantized", **options)
    with torch.no_grad():
        full = MODEL(tokens).logits
        steps = [
            MODEL(
                tokens[:, i : i + 1], position_ids=torch.tensor([[i]]), past_key_values=cache
            ).logits
            for i in range(44)
        ]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 0.2


@pytest.mark.parametrize(
    ("cache", "options", "message"),
    [
        ("ful", {}, r"unknown cache 'ful': expected one of .* \(did you mean 'full'\?\)"),
        ("full", {}, r"the cache needs max_len=N"),
        ("window", {"window": 0}, r"window must be a positive number of tokens, got window=0"),
        ("sinks", {"sinks": 0, "window": 4}, r"sinks must be a positive"),
        ("window", {"window": 4, "sinks": 2}, r"cache 'window' takes no option sinks"),
        ("quantized", {"max_len": 8, "axis": "x"}, r"axis must be 'token' or 'channel'"),
    ],
)
def test_bad_options_are_refused(cache: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyCache(MODEL.config, cache, **options)


def test_beam_search_is_refused_clearly() -> None:
    cache = PolicyCache(MODEL.config, "window", window=8)
    with pytest.raises(ValueError, match="cannot reorder, repeat or crop"):
        MODEL.generate(_prompt(5), max_new_tokens=3, num_beams=2, past_key_values=cache)


@torch.no_grad()
def test_chunked_prefill_hands_grouped_kv_to_sdpa_and_reads_the_same(monkeypatch) -> None:
    # 4 query heads over 2 KV heads: transformers repeats K/V under a mask unless asked not to.
    config = transformers.LlamaConfig(**(MODEL.config.to_dict() | {"num_key_value_heads": 2}))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    from transformers.integrations import sdpa_attention

    real, heads = sdpa_attention.torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, *args, **kwargs):
        heads.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = _prompt(24, seed=5)
    whole = model(input_ids=ids).logits[:, -1]
    heads.clear()
    logits, _ = prefill(model, ids, PolicyCache(config, "full", max_len=64), chunk=8)
    assert heads and all(h == (4, 2, True) for h in heads)
    assert (logits - whole).abs().max() <= TOL
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ  # restored


def test_chunked_reading_of_dynamic_rope_is_refused_past_the_original_length() -> None:
    # Dynamic rope changes its frequencies past max_position_embeddings; keys cached earlier keep
    # their old angles, so a chunked read past that length would compute something else.
    model = _llama(
        1,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    config = model.config
    inside = _prompt(60)
    with torch.no_grad():
        one_shot = model(inside).logits[:, -1]
    logits, _ = prefill(model, inside, PolicyCache(config, "full", max_len=60), 16)
    torch.testing.assert_close(logits, one_shot, rtol=1e-4, atol=1e-4)  # inside: allowed, exact
    with pytest.raises(ValueError, match=r"rope_type 'dynamic' changes its frequencies past 64"):
        prefill(model, _prompt(100), PolicyCache(config, "full", max_len=100), 16)
    logits, _ = prefill(model, _prompt(100), PolicyCache(config, "full", max_len=100), 100)
    assert logits.shape == (1, 264)  # one forward past the length: allowed
