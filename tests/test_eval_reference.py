"""The headline metrics against naive references written here: bits-per-byte against context
length (``evaluate_lengths``) and memory reach (``memory_reach``) beyond one segment, where the
memory is not empty.

The references score one position at a time: for each scored position they run the model on
exactly the tokens that position may see, from an empty state, and add -log p(next token). They
share no code with the library but the model and ``ByteTokenizer``-style byte counts.

Tolerance (fp32): the library scores a whole window (or segment) per forward pass, the reference
a prefix per position; a causal model gives the same logits either way up to fp32 rounding of
different matrix shapes (measured: relative differences in the summed nats of 1e-9 to 7e-8).
The bound is REL_TOL = 1e-5 relative on nats and bits-per-byte; token and byte counts are exact.
Each test also checks that the figures it compares move by over 100 x REL_TOL when the context
changes (another length, another reach), so a scoring off by one window, one position or one
segment could not pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memext import build_model
from memext.config import ModelConfig
from memext.evals.perplexity import evaluate_lengths, score_length
from memext.evals.reach import memory_reach

REL_TOL = 1e-5
VOCAB = 264


def _model(**changes) -> torch.nn.Module:
    # init_std 0.2: at the default 0.02 a random model's attention is nearly uniform and its
    # predictions barely depend on the context, which would blunt the references' teeth.
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=256, init_std=0.2
    )
    return build_model(dataclasses.replace(cfg, **changes), seed=0).eval()


def _tokens(n: int, seed: int = 0, specials: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Few distinct values make repeats, so context matters; a special token now and then
    # (ids 256+) scores its loss but counts no bytes.
    tokens = rng.integers(0, 24, n)
    if specials:
        tokens[rng.random(n) < 0.05] = 257
    return tokens.astype(np.int32)


def _byte_lengths(seed: int = 1) -> np.ndarray:
    # Not all 1: a denominator that counted inputs instead of targets, or tokens instead of
    # bytes, would differ. Specials count 0 bytes, as ByteTokenizer's do.
    lengths = np.random.default_rng(seed).integers(1, 5, VOCAB).astype(np.int64)
    lengths[256:] = 0
    return lengths


@torch.no_grad()
def _nll(model: torch.nn.Module, context: np.ndarray, target: int) -> float:
    """-ln p(target | context): the model on exactly ``context``, from an empty state."""
    logits, _ = model(torch.from_numpy(context.astype(np.int64))[None])
    return -float(F.log_softmax(logits[0, -1].double(), dim=-1)[target])


def naive_bits_per_byte(
    model: torch.nn.Module,
    tokens: np.ndarray,
    length: int,
    first: int,
    n_scored: int,
    byte_lengths: np.ndarray,
) -> dict[str, float]:
    """The definition in memext.evals.perplexity, one position at a time.

    Windows of ``length`` tokens start every ⌊length/2⌋ tokens, the first at first - ⌈length/2⌉;
    each scores its last ⌊length/2⌋ positions (its second half when the length is even). So
    position p (predicting token p + 1) belongs to window k = (p - first) // ⌊length/2⌋, and sees
    the tokens from that window's start to p.
    """
    half, lead = length // 2, length - length // 2
    nats, n_bytes = 0.0, 0
    for p in range(first, first + n_scored):
        start = first - lead + (p - first) // half * half
        assert lead + 1 <= p + 1 - start <= length  # what the definition promises
        nats += _nll(model, tokens[start : p + 1], int(tokens[p + 1]))
        n_bytes += int(byte_lengths[tokens[p + 1]])
    return {"nats": nats, "scored_bytes": n_bytes, "bits_per_byte": nats / math.log(2) / n_bytes}


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= REL_TOL * abs(want)


def test_evaluate_lengths_equals_the_naive_per_position_reference() -> None:
    model = _model()
    tokens, byte_lengths = _tokens(200), _byte_lengths()
    lengths = (8, 16, 32, 64)
    # max_tokens 45: not a multiple of any half window, so every length ends on a short window;
    # batch_size 3 leaves a partial batch.
    rows = evaluate_lengths(model, tokens, lengths, 45, byte_lengths, batch_size=3)
    assert [r["length"] for r in rows] == sorted(lengths)
    first = max(lengths) // 2  # the same positions at every length
    figures = []
    for row in rows:
        want = naive_bits_per_byte(model, tokens, row["length"], first, 45, byte_lengths)
        assert row["scored_tokens"] == 45
        assert row["scored_bytes"] == want["scored_bytes"]
        assert _close(row["nats"], want["nats"]), (row, want)
        assert _close(row["bits_per_byte"], want["bits_per_byte"]), (row, want)
        figures.append(want["bits_per_byte"])
    # Teeth: the context each length gives changes the figure by far more than the tolerance.
    for a, b in itertools.pairwise(figures):
        assert abs(a - b) > 100 * REL_TOL * a


def test_score_length_from_other_first_positions() -> None:
    model = _model()
    tokens, byte_lengths = _tokens(150, seed=2), _byte_lengths(seed=3)
    cases = [(2, 1, 17), (10, 5, 31), (10, 23, 40), (32, 40, 33), (3, 2, 17), (9, 5, 31)]
    for length, first, n in cases:
        got = score_length(model, tokens, length, first, n, byte_lengths, batch_size=2)
        want = naive_bits_per_byte(model, tokens, length, first, n, byte_lengths)
        assert got["scored_tokens"] == n and got["scored_bytes"] == want["scored_bytes"]
        assert _close(got["bits_per_byte"], want["bits_per_byte"]), (length, first, got, want)


def test_odd_lengths_score_each_position_once() -> None:
    # An odd window used to score its last (L+1)/2 positions per stride of (L-1)/2, some
    # positions twice (59 scored tokens of 40 at L=5). The trainer evaluates at train.seq_len,
    # which may be odd.
    model = _model()
    tokens, byte_lengths = _tokens(120, seed=6), _byte_lengths(seed=7)
    rows = evaluate_lengths(model, tokens, (5, 8, 9), 40, byte_lengths, batch_size=4)
    for row in rows:
        want = naive_bits_per_byte(model, tokens, row["length"], 5, 40, byte_lengths)
        assert row["scored_tokens"] == 40 and row["scored_bytes"] == want["scored_bytes"]
        assert _close(row["bits_per_byte"], want["bits_per_byte"]), (row, want)


def test_lengths_below_two_and_too_early_positions_are_refused() -> None:
    with pytest.raises(ValueError, match="length=1"):
        score_length(_model(), _tokens(100), 1, 10, 20, _byte_lengths())
    with pytest.raises(ValueError, match="first=4"):
        score_length(_model(), _tokens(100), 9, 4, 20, _byte_lengths())


# --- memory reach ----------------------------------------------------------------------------
W = 16  # the segment


def _xl(mem_len: int) -> torch.nn.Module:
    return _model(memory="xl", mem_len=mem_len, max_seq_len=4 * W)


def naive_reach(
    model: torch.nn.Module,
    tokens: np.ndarray,
    m: int,
    starts: list[int],
    byte_lengths: np.ndarray,
) -> float:
    """Bits-per-byte of the segments starting at ``starts``, each position p of a segment seeing
    every token from m - 1 segments before its segment up to p, in one pass from an empty state."""
    nats, n_bytes = 0.0, 0
    for s in starts:
        for p in range(s, s + W):
            nats += _nll(model, tokens[s - (m - 1) * W : p + 1], int(tokens[p + 1]))
            n_bytes += int(byte_lengths[tokens[p + 1]])
    return nats / math.log(2) / n_bytes


def _rows(rows: list[dict]) -> dict[tuple[int, bool], float]:
    return {(r["reach_in_segments"], r["memory"]): r["bits_per_byte"] for r in rows}


def test_memory_reach_beyond_one_segment_equals_the_naive_reference() -> None:
    # mem_len 3W keeps the whole past of a 4W reach: read in segments through the memory, the
    # last segment sees exactly what one pass over all 4W tokens sees, and what the reference
    # gives each position. Document resets are the trainer's business: no specials here.
    model = _xl(mem_len=3 * W)
    tokens, byte_lengths = _tokens(4 * W + 3 * W + 2, seed=4, specials=False), _byte_lengths()
    rows = memory_reach(model, tokens, W, (1, 2, 4), 3 * W, byte_lengths, batch_size=2)
    got = _rows(rows)
    assert set(got) == {(1, True), (1, False), (2, True), (2, False), (4, True), (4, False)}
    starts = [3 * W + i * W for i in range(3)]  # (4 - 1) W, then one segment after another
    assert all(r["scored_tokens"] == 3 * W for r in rows)
    for m in (1, 2, 4):
        want = naive_reach(model, tokens, m, starts, byte_lengths)
        assert _close(got[(m, True)], want), (m, got, want)
        assert _close(got[(m, False)], want), (m, got, want)
    # Teeth: the memory is not empty (reading 4W differs from reading the segment alone).
    assert abs(got[(4, True)] - got[(1, True)]) > 100 * REL_TOL * got[(1, True)]


def test_memory_reach_with_a_short_memory_differs_from_one_pass() -> None:
    # mem_len W: at a reach of 4W the memory holds one segment of keys, so reading in segments
    # is not one pass; the two rows must differ (they are computed, not copied).
    model = _xl(mem_len=W)
    tokens, byte_lengths = _tokens(8 * W, seed=5, specials=False), _byte_lengths()
    got = _rows(memory_reach(model, tokens, W, (1, 4), 2 * W, byte_lengths))
    assert abs(got[(4, True)] - got[(4, False)]) > 100 * REL_TOL * got[(4, False)]
    starts = [3 * W, 4 * W]
    assert _close(got[(4, False)], naive_reach(model, tokens, 4, starts, byte_lengths))
