"""Chunked prefill equals one-shot prefill; generation through every cache policy; streaming
perplexity through a cache equals its recomputation reference where it should, and stays flat.

Tolerances (fp32): logits <= 2e-5 max abs (chunked and one-shot forwards sum in different
orders); nats/token of two exact routes agree to 1e-5 relative; greedy tokens identical.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memext.config import ModelConfig
from memext.evals.streaming import sliding_recompute_perplexity, streaming_perplexity
from memext.infer.generate import generate_ids, new_state
from memext.infer.prefill import prefill
from memext.model import build_model
from memext.nn.transformer import LongLM
from memext.profiling import peak_memory

TOL = 2e-5
BYTES = np.array([1] * 256 + [0] * 8)  # a byte tokenizer's lengths: specials count no bytes


def _model(n_layers: int = 2, **changes) -> LongLM:
    cfg = ModelConfig(
        vocab_size=264, d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=512, init_std=0.2
    )
    return build_model(dataclasses.replace(cfg, **changes), seed=0).eval()


def _tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


MODEL = _model()


# --- prefill ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2, 7, 16, 45, 100])
def test_chunked_prefill_equals_one_shot(chunk: int) -> None:
    tokens = _tokens(2, 45)
    with torch.no_grad():
        one_shot = MODEL(tokens)[0]
    every, state = prefill(MODEL, tokens, new_state(MODEL, 2, 45), chunk, all_logits=True)
    last, _ = prefill(MODEL, tokens, new_state(MODEL, 2, 45), chunk)
    assert (every - one_shot).abs().max().item() <= TOL
    assert (last - one_shot[:, -1]).abs().max().item() <= TOL
    assert torch.equal(last.argmax(-1), one_shot[:, -1].argmax(-1))
    assert state.pos == 45 and state.cache.seq_len == 45


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 64), chunk=st.integers(1, 70))
def test_chunked_prefill_equals_one_shot_any_shape(b: int, t: int, chunk: int) -> None:
    tokens = _tokens(b, t, seed=t)
    with torch.no_grad():
        one_shot = MODEL(tokens)[0]
    every, _ = prefill(MODEL, tokens, new_state(MODEL, b, t), chunk, all_logits=True)
    assert (every - one_shot).abs().max().item() <= TOL


@pytest.mark.parametrize("chunk", [1, 5, 13])
def test_chunked_prompt_gives_the_same_tokens(chunk: int) -> None:
    prompt = _tokens(1, 40, seed=2)[0].tolist()
    want = list(generate_ids(MODEL, prompt, 20, temperature=0))
    assert list(generate_ids(MODEL, prompt, 20, temperature=0, chunk=chunk)) == want
    assert len(set(want)) > 3


def test_prefill_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens, got 0"):
        prefill(MODEL, _tokens(1, 4), new_state(MODEL, 1, 4), 0)
    with pytest.raises(ValueError, match=r"prefill needs token ids shaped \(B, T\) with T >= 1"):
        prefill(MODEL, torch.zeros(1, 0, dtype=torch.long), new_state(MODEL, 1, 4), 2)


def test_bounded_prefill_memory_does_not_grow_with_the_prompt() -> None:
    model = _model(max_seq_len=64)
    peaks = {}
    for n in (200, 1600):
        ids = _tokens(1, n)
        state = new_state(model, 1, cache="window", window=16)
        peaks[n] = peak_memory(lambda ids=ids, state=state: prefill(model, ids, state, 16))
    # The same chunk work at every length; a few hundred bytes of bookkeeping may differ.
    assert peaks[1600] <= peaks[200] * 1.05 + 1024, peaks


# --- generation through each policy ---------------------------------------------------------
@pytest.mark.parametrize(
    ("cache", "options"),
    [
        ("window", {"window": 16}),
        ("sinks", {"sinks": 4, "window": 16}),
        ("quantized", {"policy": "window", "window": 16, "axis": "channel", "group": 4}),
    ],
)
def test_bounded_generation_reads_past_max_seq_len(cache: str, options: dict) -> None:
    model = _model(max_seq_len=32)
    prompt = _tokens(1, 90, seed=4)[0].tolist()
    a = list(generate_ids(model, prompt, 40, temperature=0, cache=cache, cache_options=options))
    # Token by token through the prompt: the same policy, so the same continuation.
    b = list(
        generate_ids(model, prompt, 40, temperature=0, cache=cache, cache_options=options, chunk=1)
    )
    assert len(a) == 40
    if cache != "sinks":  # sinks in chunks places queries further from the sinks (documented)
        assert a == b


def test_memory_models_refuse_a_cache_policy() -> None:
    model = _model(memory="xl", mem_len=8)
    model.segment_len = 8
    with pytest.raises(ValueError, match="reads in segments through its memory"):
        list(generate_ids(model, [1, 2, 3], 2, cache="window", cache_options={"window": 4}))


# --- streaming perplexity ---------------------------------------------------------------------
def _naive_recompute(model: LongLM, ids: np.ndarray, window: int) -> float:
    """Mean nats/token, one forward per token over the window tokens ending at its input."""
    nats = 0.0
    with torch.no_grad():
        for p in range(len(ids) - 1):
            seg = torch.as_tensor(ids[max(0, p + 1 - window) : p + 1])[None]
            logp = model(seg)[0][0, -1].log_softmax(-1)
            nats -= float(logp[int(ids[p + 1])])
    return nats / (len(ids) - 1)


def test_sliding_recompute_equals_its_definition() -> None:
    model = _model()
    ids = np.random.default_rng(0).integers(0, 256, 90)
    want = _naive_recompute(model, ids, 12)
    got = sliding_recompute_perplexity(model, ids, 12, batch_size=7, progress=False)
    assert got["tokens"] == 89
    assert math.isclose(got["nats_per_token"], want, rel_tol=1e-5)
    for stride in (3, 12):  # each token scored once, from window - stride + 1 .. window tokens
        coarse = sliding_recompute_perplexity(model, ids, 12, stride, progress=False)
        assert coarse["tokens"] == 89 and math.isfinite(coarse["nats_per_token"])
    with pytest.raises(ValueError, match="need 1 <= stride <= window"):
        sliding_recompute_perplexity(model, ids, 4, 5)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_one_layer_window_stream_equals_recompute(chunk: int) -> None:
    # One layer: what a query sees through a window cache is exactly its last w tokens.
    model, w = _model(n_layers=1), 16
    ids = np.random.default_rng(1).integers(0, 256, 300)
    ref = sliding_recompute_perplexity(model, ids, w, byte_lengths=BYTES, progress=False)
    got = streaming_perplexity(
        model,
        ids,
        "window",
        chunk,
        cache_options={"window": w},
        byte_lengths=BYTES,
        every=100,
        progress=False,
    )
    assert got["tokens"] == ref["tokens"] == 299
    assert math.isclose(got["nats_per_token"], ref["nats_per_token"], rel_tol=1e-5)
    assert math.isclose(got["bits_per_byte"], ref["bits_per_byte"], rel_tol=1e-5)
    assert got["bits_per_byte"] == pytest.approx(got["nats_per_token"] / math.log(2))


def test_stream_checkpoints_are_flat_for_a_bounded_cache() -> None:
    model = _model(max_seq_len=64)
    ids = np.random.default_rng(2).integers(0, 256, 1200)
    out = streaming_perplexity(
        model,
        ids,
        "sinks",
        8,
        cache_options={"sinks": 4, "window": 32},
        every=200,
        progress=False,
    )
    marks = out["checkpoints"]
    assert [m["tokens"] for m in marks] == [8, 208, 408, 608, 808, 1008]
    assert len({m["cache_nbytes"] for m in marks}) == 1
    peaks = [m["chunk_peak_bytes"] for m in marks[1:]]  # the first chunk runs on an empty cache
    assert max(peaks) <= min(peaks) * 1.05 + 1024, peaks
    assert out["tokens_per_s"] > 0 and out["bits_per_byte"] is None
    with pytest.raises(ValueError, match="a token stream is 1-D with at least 2 tokens"):
        streaming_perplexity(model, ids[:1], "window", 8, cache_options={"window": 4})
