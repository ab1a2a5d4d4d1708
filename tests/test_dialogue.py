"""Dialogue memory: recent turns within budget, older turns retrieved, the window never exceeded."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memext.errors import MemextError
from memext.pipelines.chunking import count_tokens
from memext.pipelines.dialogue import Conversation
from memext.pipelines.encoder import Encoder
from memext.pipelines.store import RetrievalStore
from memext.tokenizer import ByteTokenizer
from tiny_bert import write_tiny_bert

BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    path = write_tiny_bert(tmp_path_factory.mktemp("bert"))
    return Encoder(path, cache=False, progress=False)


def conversation(encoder: Encoder, **kw) -> Conversation:
    return Conversation(RetrievalStore(":memory:", encoder=encoder), **kw)


def test_recent_turns_stay_within_budget_and_older_ones_move(encoder: Encoder) -> None:
    conv = conversation(encoder, recent_tokens=60, tokenizer=BYTES)
    for i in range(10):
        conv.add("user" if i % 2 == 0 else "assistant", f"message number {i} " * 2)
    assert conv.n_turns == 10 and conv.n_stored == len(conv.store) > 0
    assert sum(count_tokens(t.line, BYTES, special=False) for t in conv.recent) <= 60
    assert [t.index for t in conv.recent] == list(range(10 - len(conv.recent), 10))
    conv.add("user", "x" * 500)  # alone over budget: kept, everything else filed
    assert [t.index for t in conv.recent] == [10] and conv.n_stored == 10


def test_context_brings_back_the_relevant_old_turn(encoder: Encoder) -> None:
    conv = conversation(encoder, recent_tokens=40, tokenizer=BYTES, mode="bm25", k=2)
    conv.add("user", "remember the passkey 4817 for later")
    for i in range(8):
        conv.add("assistant" if i % 2 else "user", f"small talk about the weather, part {i}")
    conv.add("user", "what was the passkey?")
    prompt = conv.context("what was the passkey?", 120, BYTES)
    assert "user: remember the passkey 4817 for later" in prompt
    assert prompt.endswith("user: what was the passkey?")
    assert count_tokens(prompt, BYTES) <= 120
    # turns in the order they were said: the first turn comes first
    assert prompt.startswith("user: remember the passkey 4817")


def test_the_newest_turn_is_cut_from_the_left_if_it_alone_is_too_long(encoder: Encoder) -> None:
    conv = conversation(encoder, recent_tokens=1000, tokenizer=BYTES)
    conv.add("user", "hello")
    conv.add("assistant", "中文的字" * 30 + " the end")  # 3-byte characters: cuts between them
    prompt = conv.context("anything", 50, BYTES)
    assert prompt.endswith("的字 the end") and count_tokens(prompt, BYTES) <= 50
    assert "hello" not in prompt and "assistant" not in prompt
    bert = encoder.tokenizer  # adds [CLS] and [SEP]: 2 of the window
    prompt = conv.context("anything", 12, bert)
    assert count_tokens(prompt, bert) <= 12 and prompt.endswith("the end")


def test_bad_input(encoder: Encoder) -> None:
    conv = conversation(encoder)
    assert conv.context("anything", 100, BYTES) == ""  # nothing said yet
    conv.add("user", "hi")
    with pytest.raises(MemextError, match="window_tokens=2 leaves no room"):
        conv.context("q", 2, encoder.tokenizer)
    with pytest.raises(MemextError, match="role"):
        conv.add("", "hi")
    with pytest.raises(MemextError, match="needs an encoder"):
        Conversation(RetrievalStore(":memory:", model="toy", dim=4))
    with pytest.raises(MemextError, match="recent_tokens=0"):
        conversation(encoder, recent_tokens=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 80), min_size=1, max_size=12),
    recent_tokens=st.integers(1, 120),
    window=st.integers(3, 150),
    use_bert=st.booleans(),
)
def test_property_context_fits_and_keeps_the_newest_turn(
    encoder: Encoder, lengths: list[int], recent_tokens: int, window: int, use_bert: bool
) -> None:
    conv = conversation(encoder, recent_tokens=recent_tokens, tokenizer=BYTES, k=4)
    words = ["the", "cat", "sat", "on", "a", "mat", "中文", "paris", "tower"]
    for i, n in enumerate(lengths):
        conv.add("user" if i % 2 == 0 else "bot", " ".join(words[(i + j) % 9] for j in range(n)))
    tokenizer = encoder.tokenizer if use_bert else BYTES
    prompt = conv.context("the cat in paris", window, tokenizer)
    assert count_tokens(prompt, tokenizer) <= window
    newest = conv.recent[-1].line
    if count_tokens(newest, tokenizer) <= window:
        assert prompt.endswith(newest)
    else:  # cut from the left, as long as it fits
        tail = prompt.split("\n")[-1]
        assert newest.endswith(tail) and len(tail) > 0


def test_conversations_sharing_a_store_stay_apart(encoder: Encoder, tmp_path: Path) -> None:
    store = RetrievalStore(tmp_path / "m.sqlite", encoder=encoder)
    a = Conversation(store, recent_tokens=1, tokenizer=BYTES, conversation_id="a", mode="bm25")
    b = Conversation(store, recent_tokens=1, tokenizer=BYTES, conversation_id="b", mode="bm25")
    a.add("user", "the secret is paris")
    a.add("user", "ok")
    b.add("user", "the secret is tower")
    b.add("user", "ok")
    assert "paris" in a.context("secret", 200, BYTES) and "tower" not in a.context(
        "secret", 200, BYTES
    )
    assert "tower" in b.context("secret", 200, BYTES)
