"""Generation: KV-cached decoding equals full recomputation; sampling rules; stop strings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from memext.config import ModelConfig
from memext.infer.generate import generate_ids, generate_text, new_state, sample_next
from memext.model import build_model
from memext.nn.transformer import LongLM
from memext.tokenizer import ByteTokenizer


@pytest.fixture
def model(tiny_model_cfg) -> LongLM:
    # A larger init makes the logits peaked, so greedy choices are far from ties.
    cfg = dataclasses.replace(tiny_model_cfg, init_std=0.2)
    return build_model(cfg, seed=0).eval()


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _recompute_greedy(model: LongLM, prompt: list[int], n: int):
    """The obviously-correct loop: rerun the whole sequence for every new token."""
    seq, all_logits = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0][0, -1]
        all_logits.append(logits)
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :], torch.stack(all_logits)


@torch.no_grad()
def _cached_greedy(model: LongLM, prompt: list[int], n: int):
    state = new_state(model, 1, len(prompt) + n)
    logits, state = model(torch.tensor([prompt]), state)
    out, all_logits = [], []
    for _ in range(n):
        all_logits.append(logits[0, -1])
        out.append(int(logits[0, -1].argmax()))
        logits, state = model(torch.tensor([[out[-1]]]), state)
    return out, torch.stack(all_logits)


@pytest.mark.parametrize("prompt_len", [1, 7, 50])
def test_cached_decoding_equals_full_recompute(model: LongLM, prompt_len: int) -> None:
    prompt, n = _prompt(prompt_len), 40
    full_ids, full_logits = _recompute_greedy(model, prompt, n)
    cached_ids, cached_logits = _cached_greedy(model, prompt, n)
    assert (cached_logits - full_logits).abs().max().item() <= 1e-5
    assert cached_ids == full_ids
    assert list(generate_ids(model, prompt, n, temperature=0)) == full_ids
    assert len(set(full_ids)) > 3  # the check is not trivially passed by a constant output


def test_chunked_prefill_equals_one_shot(model: LongLM) -> None:
    tokens = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_shot, _ = model(tokens)
        state = new_state(model, 2, 60)
        chunks = []
        for a, b in [(0, 10), (10, 11), (11, 45)]:  # includes a single-token chunk
            logits, state = model(tokens[:, a:b], state)
            chunks.append(logits)
    assert (torch.cat(chunks, dim=1) - one_shot).abs().max().item() <= 1e-5
    assert state.pos == 45 and state.cache.seq_len == 45


def test_cache_refuses_overflow(model: LongLM) -> None:
    state = new_state(model, 1, 8)
    with torch.no_grad():
        _, state = model(torch.zeros(1, 6, dtype=torch.long), state)
        with pytest.raises(ValueError, match="the KV cache holds 8 positions; 9 were asked for"):
            model(torch.zeros(1, 3, dtype=torch.long), state)


def test_length_limits(model: LongLM) -> None:
    limit = model.max_seq_len  # 512
    assert len(list(generate_ids(model, [1] * (limit - 4), 4, temperature=0))) == 4
    with pytest.raises(ValueError, match=r"= 513 exceeds the model's limit max_seq_len=512"):
        list(generate_ids(model, [1] * (limit - 4), 5))
    with pytest.raises(ValueError, match="the prompt is empty"):
        list(generate_ids(model, [], 5))


def test_seeded_sampling_is_reproducible(model: LongLM) -> None:
    a = list(generate_ids(model, [1, 2, 3], 30, temperature=1.0, seed=7))
    b = list(generate_ids(model, [1, 2, 3], 30, temperature=1.0, seed=7))
    c = list(generate_ids(model, [1, 2, 3], 30, temperature=1.0, seed=8))
    assert a == b != c


# --- sample_next ------------------------------------------------------------------------------
def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(16, 264, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("seed", range(3))
def test_greedy_rules_equal_argmax(seed: int) -> None:
    logits = _logits(seed)
    gen = torch.Generator().manual_seed(seed)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, temperature=0), argmax)
    assert torch.equal(sample_next(logits, top_k=1, generator=gen), argmax)
    assert torch.equal(sample_next(logits, top_p=1e-6, generator=gen), argmax)
    assert torch.equal(sample_next(logits, temperature=5.0, top_k=1, generator=gen), argmax)


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = _logits(0)
    gen = torch.Generator().manual_seed(0)
    top3 = logits.topk(3, dim=-1).indices
    probs = logits.softmax(-1).sort(dim=-1, descending=True)
    # The smallest prefix of the sorted tokens whose mass reaches 0.5.
    nucleus = [
        set(o[: int((p.cumsum(0) - p < 0.5).sum())].tolist()) for p, o in zip(*probs, strict=True)
    ]
    seen_k, seen_p = [set() for _ in range(16)], [set() for _ in range(16)]
    for _ in range(200):
        for row, i in enumerate(sample_next(logits, top_k=3, generator=gen).tolist()):
            seen_k[row].add(i)
        for row, i in enumerate(sample_next(logits, top_p=0.5, generator=gen).tolist()):
            seen_p[row].add(i)
    for row in range(16):
        assert seen_k[row] <= set(top3[row].tolist())
        assert seen_p[row] <= nucleus[row]
    assert any(len(s) > 1 for s in seen_k)  # it does sample, not only take the argmax


# --- generate_text, with a model whose output we dictate ---------------------------------------
def _successor_model(successor: dict[int, int]) -> LongLM:
    """A 1-layer model that predicts successor[t] after token t, whatever came before.

    The attention and feed-forward write nothing into the residual stream, so the logits are
    head(norm(embed(t))): token t is embedded as a one-hot, and the head maps it to its successor.
    """
    cfg = ModelConfig(d_model=64, n_layers=1, n_heads=2, tie_embeddings=False, max_seq_len=256)
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.out.weight.zero_()
            block.ffn.down.weight.zero_()
        model.embed.weight.zero_()
        model.head.weight.zero_()
        for j, (t, nxt) in enumerate(successor.items()):
            model.embed.weight[t, j] = 1.0
            model.head.weight[nxt, j] = 10.0
    return model


def _cycle(text: bytes) -> dict[int, int]:
    return {a: b for a, b in zip(text, text[1:] + text[:1], strict=True)}


def _generate(model: LongLM, prompt: str, n: int, stop=()) -> list[str]:
    return list(generate_text(model, ByteTokenizer(), prompt, n, stop=stop, temperature=0))


def test_successor_model_does_what_it_is_told() -> None:
    model = _successor_model(_cycle(b"abcde"))
    assert "".join(_generate(model, "e", 12)) == "abcdeabcdeab"


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["cd"], "ab"),
        (["eab"], "abcd"),  # a stop string that spans the cycle's wrap
        (["de", "b"], "a"),  # the earliest of several stop strings wins
        (["zz"], "abcdeabcdeab"),  # never produced: everything comes out
        (["a"], ""),
    ],
)
def test_generate_text_stops_before_the_stop_string(stop, expected) -> None:
    model = _successor_model(_cycle(b"abcde"))
    pieces = _generate(model, "e", 12, stop=stop)
    assert "".join(pieces) == expected
    for s in stop:
        assert all(s not in p for p in pieces)


def test_generate_text_stops_at_end_of_document() -> None:
    tok = ByteTokenizer()
    model = _successor_model(
        {ord("x"): ord("a"), ord("a"): ord("b"), ord("b"): tok.special_id("<eod>")}
    )
    assert "".join(_generate(model, "x", 10)) == "ab"


def test_generate_text_decodes_multibyte_characters_across_tokens() -> None:
    model = _successor_model(_cycle("中a".encode()))  # e4 b8 ad 61
    pieces = _generate(model, "a", 8, stop=["a中a"])
    assert "".join(_generate(model, "a", 8)) == "中a中a"
    assert "".join(pieces) == "中"
    assert all("\ufffd" not in p for p in _generate(model, "a", 8))


# --- models that read in segments (memory variants, the LSTM) ---------------------------------
@torch.no_grad()
def _segmented_greedy(model, prompt: list[int], n: int, segment: int) -> list[int]:
    """The obviously-correct loop: re-read everything in segments from scratch for each token."""
    seq = list(prompt)
    for _ in range(n):
        state = None
        for s in range(0, len(seq), segment):
            logits, state = model(torch.tensor([seq[s : s + segment]]), state)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize(
    "changes",
    [
        {"memory": "xl", "mem_len": 8},
        {"memory": "tokens", "mem_tokens": 2},
        {"memory": "knn", "mem_len": 4, "knn_topk": 4},
        {"arch": "lstm"},
    ],
)
def test_segment_models_generate_as_they_read(tiny_model_cfg, changes: dict) -> None:
    cfg = dataclasses.replace(tiny_model_cfg, init_std=0.2, max_seq_len=16, **changes)
    model = build_model(cfg, seed=0).eval()
    model.segment_len = 8
    prompt = _prompt(21, seed=3)  # longer than max_seq_len: memory models read unbounded input
    got = list(generate_ids(model, prompt, 12, temperature=0))
    assert got == _segmented_greedy(model, prompt, 12, 8)
