"""Retrieval cross-attention for the encoder-decoder (Unlimiformer-style, test time only):
top-k cross-attention against a naive sort-and-softmax twin and against the full attention it
becomes when k covers every key; chunked encoding against the one-shot and per-chunk encoders;
cached decoding against recomputation with both on; and the refusals of bad options.

Tolerance: fp32 outputs within 1e-5 absolute (top-k sums the same terms in another order).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memext.config import ModelConfig
from memext.evals.seq2seq import evaluate_pairs
from memext.infer.seq2seq import decoder_state, greedy_decode
from memext.model import build_model
from memext.nn.seq2seq import EncoderDecoder, topk_attention

BASE = ModelConfig(
    arch="seq2seq",
    vocab_size=264,
    d_model=32,
    n_layers=2,
    encoder_layers=2,
    n_heads=2,
    max_seq_len=64,
    max_target_len=32,
    attention="sliding",
    window=8,
    global_tokens=3,
    init_std=0.2,  # larger than training's 0.02, so that dropping keys moves the logits
)
TOL = 1e-5
BOS = 256


def _model(**changes) -> EncoderDecoder:
    return build_model(dataclasses.replace(BASE, **changes), seed=0).eval()


def _data(b: int, s: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (b, s), generator=gen)
    return src, torch.randint(0, 256, (b, t), generator=gen)


def _naive_topk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int) -> torch.Tensor:
    """Sort every query's logits, keep the first ``topk``, softmax them, mix their values."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, N)
    order = logits.argsort(dim=-1, descending=True)[..., :topk]
    kept = logits.gather(-1, order)
    weights = torch.softmax(kept, dim=-1)  # (B, H, T, k)
    picked = v[:, :, None].expand(*order.shape[:3], *v.shape[-2:])  # (B, H, T, N, D)
    values = picked.gather(-2, order[..., None].expand(*order.shape, v.shape[-1]))
    return (weights[..., None] * values).sum(dim=-2)


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    t=st.integers(1, 6),
    n=st.integers(1, 40),
    d=st.sampled_from([1, 4, 8]),
    topk=st.integers(1, 48),
    seed=st.integers(0, 2**16),
)
def test_topk_attention_equals_naive_sort(b, h, t, n, d, topk, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, size, d, generator=gen) for size in (t, n, n))
    got = topk_attention(q, k, v, topk)
    assert got.shape == (b, h, t, d)
    assert (got - _naive_topk(q, k, v, topk)).abs().max().item() <= TOL
    if topk >= n:  # every key kept: the full attention
        full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert (got - full).abs().max().item() <= TOL


def test_topk_attention_in_query_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import memext.nn.seq2seq as s2s

    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 3, 7, 4, generator=gen), *torch.randn(2, 2, 3, 30, 4, generator=gen)
    whole = topk_attention(q, k, v, 5)
    monkeypatch.setattr(s2s, "CHUNK_ELEMENTS", 2 * 3 * 30 * 2)  # blocks of 2 queries
    assert (topk_attention(q, k, v, 5) - whole).abs().max().item() <= TOL
    monkeypatch.setattr(s2s, "CHUNK_ELEMENTS", 1)  # one query at a time
    assert (topk_attention(q, k, v, 5) - whole).abs().max().item() <= TOL


def test_topk_covering_every_key_equals_full_cross_attention() -> None:
    model = _model()
    src, tgt = _data(2, 40, 9)
    n = model.n_slots + src.shape[1]
    with torch.no_grad():
        full, _ = model(src, tgt)
        covered, _ = model(src, tgt, cross_topk=n)
        beyond, _ = model(src, tgt, cross_topk=10 * n)
        few, _ = model(src, tgt, cross_topk=2)
    assert (covered - full).abs().max().item() <= TOL
    assert (beyond - full).abs().max().item() <= TOL
    assert (few - full).abs().max().item() > 1e-3  # the check can fail: 2 keys are not all
    plain = greedy_decode(model, src, BOS, eos=-1, max_new_tokens=12)
    assert greedy_decode(model, src, BOS, -1, 12, cross_topk=n) == plain


def test_none_is_the_plain_model_bit_for_bit() -> None:
    model = _model()
    src, tgt = _data(2, 30, 7, seed=1)
    with torch.no_grad():
        a, _ = model(src, tgt)
        b, _ = model(src, tgt, encode_chunk=None, cross_topk=None)
    assert torch.equal(a, b)


@pytest.mark.parametrize("s", [1, 37, 64])
def test_one_chunk_is_the_one_shot_encoder(s: int) -> None:
    model = _model()
    src, _ = _data(2, s, 1, seed=s)
    with torch.no_grad():
        whole = model.encode(src)
        assert torch.equal(model.encode(src, chunk=s), whole)
        assert torch.equal(model.encode(src, chunk=64), whole)


@pytest.mark.parametrize(("s", "chunk"), [(40, 16), (48, 16), (150, 64), (5, 1)])
def test_chunks_are_encoded_alone_and_concatenated(s: int, chunk: int) -> None:
    model = _model()
    src, _ = _data(2, s, 1, seed=s)
    with torch.no_grad():
        got = model.encode(src, chunk=chunk)
        want = torch.cat([model.encode(src[:, i : i + chunk]) for i in range(0, s, chunk)], dim=1)
    n_chunks = -(-s // chunk)
    assert got.shape == (2, n_chunks * model.n_slots + s, BASE.d_model)
    assert (got - want).abs().max().item() <= TOL


def test_chunked_encoding_reads_past_max_seq_len() -> None:
    model = _model()
    src, tgt = _data(1, 150, 5, seed=2)  # 150 > max_seq_len = 64
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(src, tgt)
    with torch.no_grad():
        logits, state = model(src, tgt, encode_chunk=64, cross_topk=16)
    assert logits.shape == (1, 5, BASE.vocab_size)
    assert state.cross[0][0].shape[-2] == 3 * model.n_slots + 150


@settings(max_examples=8, deadline=None)
@given(
    b=st.integers(1, 3),
    s=st.integers(2, 160),
    chunk=st.sampled_from([None, 7, 32, 64]),
    topk=st.sampled_from([None, 1, 4, 16]),
    trained=st.sampled_from([None, 30]),
    seed=st.integers(0, 2**16),
)
def test_cached_greedy_equals_recompute_with_retrieval(b, s, chunk, topk, trained, seed) -> None:
    model = _model()
    if chunk is None and s > BASE.max_seq_len:
        chunk = 64
    src, _ = _data(b, s, 1, seed)
    options = {"encode_chunk": chunk, "cross_topk": topk, "trained_len": trained}
    cached = greedy_decode(model, src, BOS, eos=-1, max_new_tokens=12, **options)
    recomputed = greedy_decode(model, src, BOS, -1, 12, cache=None, **options)
    assert cached == recomputed
    assert all(len(row) == 12 for row in cached)


def test_cached_logits_equal_one_pass_with_retrieval() -> None:
    model = _model()
    src, tgt = _data(2, 100, 8, seed=5)
    options = {"encode_chunk": 24, "cross_topk": 5, "trained_len": 40}
    with torch.no_grad():
        whole, _ = model(src, tgt, **options)
        state = decoder_state(model, 2)
        steps = []
        for i in range(tgt.shape[1]):
            logits, state = model(src if i == 0 else None, tgt[:, i : i + 1], state, **options)
            steps.append(logits)
    assert (torch.cat(steps, dim=1) - whole).abs().max().item() <= TOL


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"encode_chunk": 0}, "encode_chunk=0 must be positive"),
        ({"encode_chunk": -3}, "encode_chunk=-3 must be positive"),
        ({"encode_chunk": 65}, "encode_chunk=65 exceeds .* max_seq_len=64"),
        ({"encode_chunk": 2.5}, "encode_chunk=2.5 must be a positive int"),
        ({"cross_topk": 0}, "cross_topk=0 must be positive"),
        ({"cross_topk": True}, "cross_topk=True must be a positive int"),
        ({"trained_len": 0}, "trained_len=0 must be positive"),
        ({"trained_len": 1.5}, "trained_len=1.5 must be a positive int"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    model = _model()
    src, tgt = _data(1, 10, 3)
    with pytest.raises(ValueError, match=match):
        model(src, tgt, **options)
    with pytest.raises(ValueError, match=match):
        greedy_decode(model, src, BOS, 257, 4, **options)
    if "encode_chunk" in options:
        with pytest.raises(ValueError, match=match):
            model.encode(src, chunk=options["encode_chunk"])


def test_evaluate_pairs_takes_the_options() -> None:
    from memext.data.filler import Filler
    from memext.evals.seq2seq import held_out_samples
    from memext.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    filler = Filler.from_text(tok, "Memory lets a model read far past its window. ")
    samples = held_out_samples("cipher", tok, filler, 120, 2)
    model = _model(vocab_size=tok.vocab_size, max_seq_len=128)
    plain = evaluate_pairs(model, tok, samples, max_new_tokens=4)
    covered = evaluate_pairs(model, tok, samples, max_new_tokens=4, cross_topk=10_000)
    assert abs(covered["loss"] - plain["loss"]) <= 1e-4
    long = evaluate_pairs(model, tok, samples, max_new_tokens=4, encode_chunk=50, cross_topk=8)
    assert long["n"] == 2 and math.isfinite(long["loss"])
    with pytest.raises(ValueError, match="cross_topk=0"):
        evaluate_pairs(model, tok, samples, cross_topk=0)


def _queries_scaled(model: EncoderDecoder, factor: float) -> EncoderDecoder:
    """A twin whose cross-attention query projections are multiplied by ``factor``: its logits
    are the model's times ``factor``, as ``trained_len`` promises."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for block in twin.decoder:
            block.cross.q.weight.mul_(factor)
    return twin


@pytest.mark.parametrize(
    ("s", "trained", "options"),
    [
        (40, 10, {}),
        (40, 90, {}),
        (150, 64, {"encode_chunk": 64}),
        (150, 64, {"encode_chunk": 64, "cross_topk": 20}),
    ],
)
def test_trained_len_scales_cross_logits_by_log_length(s: int, trained: int, options) -> None:
    model = _model()
    src, tgt = _data(2, s, 6, seed=s)
    chunks = -(-s // options.get("encode_chunk", s))
    n = chunks * model.n_slots + s  # encoder states the decoder reads
    factor = math.log(n) / math.log(trained + model.n_slots)
    with torch.no_grad():
        got, _ = model(src, tgt, trained_len=trained, **options)
        want, _ = _queries_scaled(model, factor)(src, tgt, **options)
        plain, _ = model(src, tgt, **options)
    assert (got - want).abs().max().item() <= TOL
    assert (got - plain).abs().max().item() > 1e-3  # the check can fail: the scale moved them


def test_trained_len_at_the_read_length_is_the_plain_model() -> None:
    model = _model()
    src, tgt = _data(2, 40, 6, seed=4)
    with torch.no_grad():
        plain, _ = model(src, tgt)
        same, _ = model(src, tgt, trained_len=40)  # log N / log N = 1
    assert (same - plain).abs().max().item() <= TOL


def test_trained_len_needs_two_states() -> None:
    model = _model(global_tokens=0)
    src, tgt = _data(1, 10, 3)
    with pytest.raises(ValueError, match="trained_len=1: need"):
        model(src, tgt, trained_len=1)
