"""Token-aware chunking: limits with special tokens, exact overlap, offsets back to the source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memext.errors import MemextError
from memext.pipelines.chunking import (
    Chunk,
    chunk_text,
    count_tokens,
    iter_chunks,
    special_token_count,
    token_spans,
)
from memext.tokenizer import ByteTokenizer, train_bpe
from tiny_bert import tiny_bert_tokenizer

BERT = tiny_bert_tokenizer()
BYTES = ByteTokenizer()

PROSE = (
    "The man is eating food. The girl is carrying a baby!\n\n"
    "我们的中文字是好的。这个字是一个好字。\n\n"
    "Long documents are cut into chunks; each chunk fits the encoder. Is it so? It is."
)


def check_chunks(text: str, chunks: list[Chunk], tokenizer: Any, max_tokens: int, overlap: int):
    """Every promise of ``chunk_text``, checked against the tokens of the whole text.

    The overlap is exact, except with byte-level tokens where the next chunk would start in a
    character: it then starts at that character, up to 3 tokens (bytes) earlier.
    """
    spans = token_spans(text, tokenizer)
    ids = [int(i) for i in spans.ids]
    n_special = special_token_count(tokenizer)
    at = 0  # where each chunk's tokens begin in the whole text's tokens
    for i, c in enumerate(chunks):
        assert c.index == i
        assert c.n_tokens + n_special <= max_tokens
        assert text[c.start : c.end] == c.text
        assert list(c.token_ids) == ids[at : at + c.n_tokens]
        assert c.start == spans.starts[at] and c.end == spans.ends[at + c.n_tokens - 1]
        if i + 1 < len(chunks):
            nxt = int(np.searchsorted(spans.starts, chunks[i + 1].start))
            exact = at + c.n_tokens - overlap
            slack = 3 if hasattr(tokenizer, "byte_lengths") else 0  # memext byte-level
            assert at < nxt and exact - slack <= nxt <= exact
            if spans.starts[exact] >= spans.ends[exact - 1]:  # exact falls between characters
                assert nxt == exact
            at = nxt
    assert at + chunks[-1].n_tokens == len(ids)  # the last chunk ends the text
    covered = [False] * len(text)
    for c in chunks:
        covered[c.start : c.end] = [True] * (c.end - c.start)
    # every character the tokenizer reads lies in a chunk (whitespace between chunks may not)
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())
    if isinstance(tokenizer, ByteTokenizer):
        assert all(c.text.encode() == bytes(c.token_ids) for c in chunks)


@pytest.mark.parametrize("overlap", [0, 1, 5])
@pytest.mark.parametrize("max_tokens", [8, 13, 40])
@pytest.mark.parametrize("tokenizer", [BERT, BYTES], ids=["bert", "bytes"])
def test_chunks_keep_every_promise(tokenizer: Any, max_tokens: int, overlap: int) -> None:
    if tokenizer is BYTES and max_tokens - overlap < 7:
        # a chunk must advance by a whole character and end between two (see the property)
        with pytest.raises(MemextError, match="cannot cut the text"):
            chunk_text(PROSE, tokenizer, max_tokens, overlap)
        return
    for boundaries in (True, False):
        chunks = chunk_text(PROSE, tokenizer, max_tokens, overlap, boundaries=boundaries)
        check_chunks(PROSE, chunks, tokenizer, max_tokens, overlap)


def test_the_limit_counts_special_tokens() -> None:
    assert special_token_count(BERT) == 2 and special_token_count(BYTES) == 0
    chunks = chunk_text("the cat sat on the mat " * 10, BERT, 10, boundaries=False)
    assert max(c.n_tokens for c in chunks) == 8  # [CLS] + 8 + [SEP] = 10
    assert count_tokens(chunks[0].text, BERT) == 10


def test_bytes_never_split_a_chinese_character() -> None:
    text = "我们的中文字是好的。" * 3  # 3 UTF-8 bytes per character
    chunks = chunk_text(text, BYTES, 10, overlap=3, boundaries=False)
    check_chunks(text, chunks, BYTES, 10, 3)
    assert all(c.n_tokens == 9 for c in chunks[:-1])  # 3 characters, never 3⅓
    assert chunks[1].start == 2  # overlap of 3 bytes = one character
    with pytest.raises(MemextError, match="cannot cut the text between characters"):
        chunk_text(text, BYTES, 4, overlap=2)


def test_bpe_and_hf_wrapper_offsets(tmp_path: Path) -> None:
    from memext.hf.tokenizer import HFTokenizer

    bpe = train_bpe([PROSE] * 3, 300, tmp_path / "bpe.json")
    for overlap in (0, 3):
        check_chunks(PROSE, chunk_text(PROSE, bpe, 12, overlap), bpe, 12, overlap)
    BERT.save_pretrained(tmp_path / "bert")
    wrapped = HFTokenizer(tmp_path / "bert")
    chunks = chunk_text(PROSE, wrapped, 12, 2)
    assert chunks == chunk_text(PROSE, BERT, 12, 2)
    check_chunks(PROSE, chunks, BERT, 12, 2)


def test_prefers_paragraphs_then_sentences() -> None:
    para = "one two three four five six seven eight nine ten eleven twelve.\n\nthirteen"
    # 50 bytes would end mid-paragraph; the paragraph break (byte 66) is in the last 40%
    chunks = chunk_text(para, BYTES, 70, boundary_tail=0.4)
    assert chunks[0].text.endswith("twelve.\n\n") and chunks[1].text == "thirteen"
    sentences = "One sentence here. Another one follows here and it goes on for a while"
    chunks = chunk_text(sentences, BYTES, 40, boundary_tail=0.6)
    assert chunks[0].text == "One sentence here. "
    words = chunk_text("abcdefgh ijklmnop qrstuvwx", BYTES, 12, boundary_tail=0.5)
    assert [c.text for c in words] == ["abcdefgh ", "ijklmnop ", "qrstuvwx"]
    # without boundaries every chunk but the last is full
    assert [c.n_tokens for c in chunk_text(para, BYTES, 20, boundaries=False)[:-1]] == [20] * 3


def test_bad_input() -> None:
    with pytest.raises(MemextError, match="empty"):
        chunk_text("", BERT, 16)
    with pytest.raises(MemextError, match="only whitespace"):
        chunk_text(" \n\t ", BYTES, 16)
    with pytest.raises(MemextError, match="not valid UTF-8 \\(byte 3"):
        chunk_text(b"abc\xff\xfe", BYTES, 16)
    assert chunk_text("中文".encode(), BYTES, 16)[0].text == "中文"
    with pytest.raises(MemextError, match="overlap=14 is invalid: expected 0 <= overlap < 14"):
        chunk_text("the cat", BERT, 16, overlap=14)
    with pytest.raises(MemextError, match="max_tokens=2 leaves no room"):
        chunk_text("the cat", BERT, 2)
    with pytest.raises(MemextError, match="boundary_tail"):
        chunk_text("the cat", BERT, 16, boundary_tail=1.5)
    with pytest.raises(TypeError, match="str or UTF-8 bytes"):
        chunk_text(42, BERT, 16)  # type: ignore[arg-type]


ALPHABET = "abc xyz.!?\n中文字😀,"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(alphabet=ALPHABET, min_size=1, max_size=120).filter(lambda t: not t.isspace()),
    room=st.integers(8, 30),
    overlap_frac=st.floats(0, 0.99),
    tail=st.floats(0, 1),
    use_bert=st.booleans(),
)
def test_property_chunks_cover_the_text(
    text: str, room: int, overlap_frac: float, tail: float, use_bert: bool
) -> None:
    tokenizer = BERT if use_bert else BYTES
    max_tokens = room + special_token_count(tokenizer)
    # bytes: a character takes up to 4 tokens, and a chunk must advance by a whole character
    # and end between two, which takes up to 7 tokens beyond the overlap
    overlap = min(int(overlap_frac * room), room - (1 if use_bert else 7))
    chunks = chunk_text(text, tokenizer, max_tokens, overlap, boundary_tail=tail)
    check_chunks(text, chunks, tokenizer, max_tokens, overlap)


def _split(text: str, cuts: list[int]) -> list[str]:
    """``text`` in pieces, cut at ``cuts`` (positions, any order, repeats allowed)."""
    at = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *at], [*at, len(text)], strict=True)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(alphabet=ALPHABET + "  \n\n", min_size=1, max_size=400).filter(
        lambda t: not t.isspace()
    ),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    window=st.integers(1, 120),
    room=st.integers(8, 30),
    overlap_frac=st.floats(0, 0.99),
    use_bert=st.booleans(),
)
def test_property_streamed_chunks_equal_the_whole_texts(
    text: str, cuts: list[int], window: int, room: int, overlap_frac: float, use_bert: bool
) -> None:
    """However the text arrives and however small the window, the chunks are chunk_text's."""
    tokenizer = BERT if use_bert else BYTES
    max_tokens = room + special_token_count(tokenizer)
    overlap = min(int(overlap_frac * room), room - (1 if use_bert else 7))
    whole = chunk_text(text, tokenizer, max_tokens, overlap)
    streamed = list(iter_chunks(_split(text, cuts), tokenizer, max_tokens, overlap, window=window))
    assert streamed == whole


@pytest.mark.parametrize("boundaries", [True, False])
@pytest.mark.parametrize("window", [1, 7, 19, 64])
def test_streamed_windows_tokenize_every_word_whole(window: int, boundaries: bool) -> None:
    """A word the tokenizer reads as one [UNK] only whole, and chunks that start inside words
    (no boundaries): a window that cut a word, or began inside one, would change its tokens."""
    text = "the abcdefgh😀 cat sat abcdefghijklmnopqrstuvwxyz. " * 12
    for overlap in (0, 3):
        whole = chunk_text(text, BERT, 10, overlap, boundaries=boundaries)
        pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
        streamed = iter_chunks(pieces, BERT, 10, overlap, boundaries=boundaries, window=window)
        assert list(streamed) == whole


def test_streamed_chunks_of_a_long_text_with_the_real_tokenizer() -> None:
    """MiniLM's WordPiece over prose, code and CJK, read in small windows, cuts where the whole
    text does, token ids included."""
    import transformers

    from memext.pipelines.encoder import default_model_dir

    minilm = transformers.AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    source = Path(np.__file__).read_text(encoding="utf-8")
    text = (PROSE + "\n\n" + source) * 3
    whole = chunk_text(text, minilm, 128, 16)
    pieces = [text[i : i + 997] for i in range(0, len(text), 997)]
    assert list(iter_chunks(pieces, minilm, 128, 16, window=3000)) == whole
    assert len(whole) > 20


def test_streaming_refuses_what_chunk_text_refuses() -> None:
    with pytest.raises(MemextError, match="empty"):
        list(iter_chunks(["", ""], BERT, 16, window=4))
    with pytest.raises(MemextError, match="only whitespace"):
        list(iter_chunks([" \n", "\t "], BERT, 16, window=2))
    with pytest.raises(TypeError, match="str pieces"):
        list(iter_chunks([b"abc"], BERT, 16))  # type: ignore[list-item]
    with pytest.raises(MemextError, match="window=0"):
        list(iter_chunks(["abc"], BERT, 16, window=0))
