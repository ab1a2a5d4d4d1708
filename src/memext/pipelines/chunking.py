"""Token-aware chunking: split a long text into pieces an encoder can read whole.

Every chunk holds at most ``max_tokens`` tokens *including* the special tokens the tokenizer adds
around a sequence ([CLS] ... [SEP] for BERT), consecutive chunks share exactly ``overlap`` tokens,
and ``text[chunk.start:chunk.end] == chunk.text``, with offsets in characters.

Tokenizers: a Hugging Face fast tokenizer (offsets from ``return_offsets_mapping``), memext's
``HFTokenizer`` (its ``.hf``), or any memext ``Tokenizer`` whose tokens decode to exact bytes
(``ByteTokenizer``, ``BPETokenizer``): their byte offsets are turned into character offsets, and
a chunk never ends inside a character, so a Chinese character's three UTF-8 bytes stay together.

With ``boundaries=True`` a chunk may end early, but only within the last ``boundary_tail`` of
its length, at the best boundary found there: paragraph, then sentence, then word. Starting the
next chunk at a word boundary is preferred too, so that re-tokenizing a chunk's text gives the
same tokens (a WordPiece chunk that began at "##ing" would not).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from memext.errors import MemextError

# Each CJK character is a word of its own to BERT-style tokenizers (tokenize_chinese_chars).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD_CHAR = re.compile(rf"(?:(?![{_CJK}])\w)")  # a letter or digit, not CJK
_NOT_MARK = re.compile(r"[^\x01]")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]»]*\s+|[。！？]+[”’」』）]*\s*")
_PARAGRAPH_END = re.compile(r"\n[^\S\n]*\n\s*")

# Cut quality between two tokens; higher is better, 0 is never allowed.
_INSIDE_CHAR, _IN_WORD, _WORD, _SENTENCE, _PARAGRAPH = range(5)


@dataclass(frozen=True)
class Chunk:
    """One piece of a text: ``source[start:end] == text`` (character offsets).

    ``token_ids`` are the chunk's tokens without special tokens; the encoder adds those, and
    ``n_tokens`` plus the tokenizer's special-token count is at most the chunk limit.
    """

    index: int
    text: str
    start: int
    end: int
    token_ids: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TokenSpans:
    """A text's tokens (no special tokens) and each one's character span ``[starts, ends)``."""

    ids: np.ndarray  # (n,) int64
    starts: np.ndarray  # (n,) int64, non-decreasing
    ends: np.ndarray  # (n,) int64, non-decreasing


def check_text(text: str | bytes) -> str:
    """The text as ``str``; ``MemextError`` for bytes that are not UTF-8, or nothing to read."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MemextError(
                f"the text is not valid UTF-8 (byte {e.start}: {e.reason}); "
                "decode it with its real encoding first"
            ) from None
    if not isinstance(text, str):
        raise TypeError(f"expected str or UTF-8 bytes, got {type(text).__name__}")
    if not text:
        raise MemextError("the text is empty: there is nothing to chunk")
    if text.isspace():
        raise MemextError("the text is only whitespace: there is nothing to chunk")
    return text


def _hf(tokenizer: Any) -> Any | None:
    """The Hugging Face tokenizer behind ``tokenizer``, or None for a memext byte tokenizer."""
    hf = getattr(tokenizer, "hf", tokenizer)  # memext.hf.HFTokenizer keeps it as .hf
    return hf if hasattr(hf, "num_special_tokens_to_add") else None


def special_token_count(tokenizer: Any) -> int:
    """How many special tokens the tokenizer adds around one sequence (0 for memext's own)."""
    hf = _hf(tokenizer)
    return 0 if hf is None else int(hf.num_special_tokens_to_add(pair=False))


def token_spans(text: str, tokenizer: Any) -> TokenSpans:
    """Tokenize ``text`` without special tokens, with each token's character span."""
    hf = _hf(tokenizer)
    if hf is not None:
        if not getattr(hf, "is_fast", False):
            raise MemextError(
                f"{type(hf).__name__} is a slow tokenizer without character offsets: "
                "load the fast one (AutoTokenizer.from_pretrained(..., use_fast=True))"
            )
        # verbose=False: a long text is the point here, not a mistake worth a warning
        enc = hf(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            truncation=False,
            verbose=False,
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        # Some tokenizers give a zero-width or backwards span to inserted pieces (a prefix
        # space); clamping keeps spans ordered so cuts between them stay well defined.
        starts = np.maximum.accumulate(np.clip(spans[:, 0], 0, len(text)))
        ends = np.maximum(np.maximum.accumulate(np.clip(spans[:, 1], 0, len(text))), starts)
        return TokenSpans(ids, starts, ends)
    if not hasattr(tokenizer, "byte_lengths"):
        raise TypeError(
            f"{type(tokenizer).__name__} is neither a Hugging Face fast tokenizer nor a memext "
            "Tokenizer (encode + byte_lengths)"
        )
    raw = text.encode("utf-8")
    ids = np.asarray(tokenizer.encode(raw), dtype=np.int64)
    lengths = np.asarray(tokenizer.byte_lengths(), dtype=np.int64)[ids]
    if int(lengths.sum()) != len(raw):
        raise MemextError(
            f"the {getattr(tokenizer, 'name', type(tokenizer).__name__)} tokenizer's tokens do "
            "not decode to the text's exact bytes, so chunk offsets cannot be computed; "
            "use a Hugging Face fast tokenizer"
        )
    byte_ends = np.cumsum(lengths)
    byte_starts = byte_ends - lengths
    # Character index of every byte (continuation bytes belong to the character before them),
    # plus one past the end so that byte offset len(raw) maps to len(text).
    buf = np.frombuffer(raw, dtype=np.uint8)
    char_of_byte = np.append(np.cumsum((buf & 0xC0) != 0x80) - 1, len(text))
    starts = char_of_byte[byte_starts]
    last_byte = np.maximum(byte_ends - 1, byte_starts)
    ends = np.where(lengths > 0, char_of_byte[last_byte] + 1, starts)
    return TokenSpans(ids, starts.astype(np.int64), ends.astype(np.int64))


def count_tokens(text: str, tokenizer: Any, *, special: bool = True) -> int:
    """The number of tokens ``text`` takes, with the special tokens a model input adds."""
    n = len(token_spans(text, tokenizer).ids) if text else 0
    return n + (special_token_count(tokenizer) if special else 0)


def _cut_levels(text: str, spans: TokenSpans) -> np.ndarray:
    """(n + 1,) quality of a cut before token j; [0] and [n] (the text's ends) are paragraphs."""
    at = np.full(len(text) + 1, _WORD, dtype=np.int8)  # per character position
    # 1 per word character, 0 otherwise, one byte per character: two regex passes in C are
    # far faster than a Python loop over a long document's characters
    marks = _NOT_MARK.sub("\x00", _WORD_CHAR.sub("\x01", text)).encode("latin-1")
    word = np.frombuffer(marks, dtype=np.uint8).astype(bool)
    at[1:-1][word[:-1] & word[1:]] = _IN_WORD
    for m in _SENTENCE_END.finditer(text):
        at[m.end()] = _SENTENCE
    for m in _PARAGRAPH_END.finditer(text):
        at[m.end()] = _PARAGRAPH
    n = len(spans.ids)
    levels = np.full(n + 1, _PARAGRAPH, dtype=np.int8)
    levels[1:n] = at[spans.starts[1:]]
    # A token that starts inside the previous one's character span shares a character with it
    # (the bytes of one Chinese character): no cut there.
    levels[1:n][spans.starts[1:] < spans.ends[:-1]] = _INSIDE_CHAR
    return levels


def chunk_text(
    text: str | bytes,
    tokenizer: Any,
    max_tokens: int,
    overlap: int = 0,
    *,
    boundaries: bool = True,
    boundary_tail: float = 0.2,
) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens each, special tokens included.

    Args:
        text: the document (``str``, or UTF-8 ``bytes``).
        tokenizer: a Hugging Face fast tokenizer, memext's ``HFTokenizer``, or a memext
            ``Tokenizer`` whose tokens are exact bytes (``ByteTokenizer``, ``BPETokenizer``).
        max_tokens: the encoder's limit, counting the special tokens the tokenizer adds.
        overlap: tokens each chunk shares with the next (the stride is the chunk length minus
            it). Exact, except where it would start the next chunk inside a character (byte
            tokens of a multi-byte character): the overlap then grows to that character's start.
        boundaries: end a chunk early at a paragraph, sentence or word boundary when one lies
            within its last ``boundary_tail`` (a fraction of the room for text).
        boundary_tail: see ``boundaries``; 0 fills every chunk to the limit.

    Returns:
        The chunks in order. Together they hold every token of the text; the last ``overlap``
        tokens of a chunk are the first of the next (see ``overlap``).

    Raises:
        MemextError: the text is empty, whitespace only, or not UTF-8; the limits leave no room;
            a single character needs more tokens than a chunk can advance by.
    """
    text = check_text(text)
    return list(
        iter_chunks(
            [text],
            tokenizer,
            max_tokens,
            overlap,
            boundaries=boundaries,
            boundary_tail=boundary_tail,
            window=None,
        )
    )


#: Characters of text ``iter_chunks`` tokenizes at a time: about a quarter of a million tokens,
#: tens of megabytes of token lists, whatever the document's length.
WINDOW = 1 << 20


def iter_chunks(
    pieces: Iterable[str],
    tokenizer: Any,
    max_tokens: int,
    overlap: int = 0,
    *,
    boundaries: bool = True,
    boundary_tail: float = 0.2,
    window: int | None = WINDOW,
) -> Iterator[Chunk]:
    """``chunk_text`` of the concatenated ``pieces``, in bounded memory: the chunks, one by one.

    The text is tokenized a window of about ``window`` characters at a time (``None``: all at
    once). A window is cut only up to its last whitespace, where the tokens before cannot
    change with what follows (tokenizers split words at whitespace first), and the next window
    starts at the whitespace before the chunk still pending, so every word is tokenized whole
    and the chunks equal ``chunk_text``'s of the whole text. Offsets count characters from
    the start of the first piece.

    Raises:
        MemextError: as ``chunk_text``, once the pieces end (nothing is yielded for a text
            that turns out to be empty or whitespace only).
    """
    n_special = special_token_count(tokenizer)
    room = max_tokens - n_special  # tokens of text per chunk
    if room <= 0:
        raise MemextError(
            f"max_tokens={max_tokens} leaves no room for text: the tokenizer adds {n_special} "
            f"special tokens to every chunk; use max_tokens > {n_special}"
        )
    if not 0 <= overlap < room:
        raise MemextError(
            f"overlap={overlap} is invalid: expected 0 <= overlap < {room} (max_tokens={max_tokens} "
            f"minus {n_special} special tokens), or chunks could not advance"
        )
    if not 0.0 <= boundary_tail <= 1.0:
        raise MemextError(
            f"boundary_tail={boundary_tail} is invalid: expected a fraction in [0, 1]"
        )
    if window is not None and window < 1:
        raise MemextError(f"window={window} is invalid: expected >= 1 characters")
    tail = int(boundary_tail * room) if boundaries else 0
    source = iter(pieces)
    buf = ""  # the text from `base` on, tokenized anew each round
    base = 0  # character offset of buf[0] in the whole text
    first = 0  # where in buf the next chunk starts
    index = 0  # the next chunk's number
    want = window  # characters past `first` to read before cutting
    eof, seen, blank = False, 0, True
    while True:
        parts, size = [buf], len(buf)
        while not eof and (want is None or size - first < want):
            piece = next(source, None)
            if piece is None:
                eof = True
                break
            if not isinstance(piece, str):
                raise TypeError(f"iter_chunks reads str pieces, got {type(piece).__name__}")
            parts.append(piece)
            size += len(piece)
            seen += len(piece)
            blank = blank and (not piece or piece.isspace())
        buf = "".join(parts)
        if eof and not seen:
            raise MemextError("the text is empty: there is nothing to chunk")
        if eof and blank:
            raise MemextError("the text is only whitespace: there is nothing to chunk")
        limit = len(buf) if eof else _last_space_run(buf, first)
        local = buf[:limit]
        spans = token_spans(local, tokenizer)
        n = len(spans.ids)
        if n == 0 and eof:
            raise MemextError(
                "the tokenizer finds no tokens in the text: there is nothing to chunk"
            )
        s = _token_at(spans.starts, first) if n else 0
        if not eof and s + room >= n:  # not one whole chunk's tokens yet: read more
            want = 2 * max(size - first, 1)
            continue
        levels = _cut_levels(local, spans)
        # the latest allowed cut at or before each token position
        latest = np.maximum.accumulate(np.where(levels > _INSIDE_CHAR, np.arange(n + 1), -1))

        # Within a window every cut sees what the whole text would show it: the ends and next
        # starts it weighs lie at or before token s + room < n, all tokens whose text is whole.
        while s + room < n:
            e, next_s = _choose_end(levels, latest, s, s + room, overlap, tail)
            yield _chunk(index, local, base, spans, s, e)
            index += 1
            s = next_s
        if eof:
            yield _chunk(index, local, base, spans, s, n)
            return
        keep = _space_run_before(buf, int(spans.starts[s]))
        buf, base, first = buf[keep:], base + keep, int(spans.starts[s]) - keep
        want = window


def _chunk(index: int, text: str, base: int, spans: TokenSpans, s: int, e: int) -> Chunk:
    """Chunk ``index``: tokens ``[s, e)`` of ``text``, which starts at character ``base``."""
    a, b = int(spans.starts[s]), int(spans.ends[e - 1])
    return Chunk(index, text[a:b], base + a, base + b, tuple(spans.ids[s:e].tolist()))


def _last_space_run(text: str, after: int) -> int:
    """Where the last run of whitespace after ``after`` starts (``after`` if there is none):
    the tokens before it are whole whatever text comes next."""
    i = len(text)
    while i > after and not text[i - 1].isspace():  # the last, maybe unfinished, word
        i -= 1
    if i == after:
        return after
    while i > after and text[i - 1].isspace():
        i -= 1
    return i


def _space_run_before(text: str, at: int) -> int:
    """Where the run of whitespace before the word holding ``at`` starts (0 if none): a
    tokenizer reading from there reads that word whole, as it did in the whole text."""
    i = at
    while i > 0 and not text[i - 1].isspace():
        i -= 1
    while i > 0 and text[i - 1].isspace():
        i -= 1
    return i


def _token_at(starts: np.ndarray, at: int) -> int:
    """The first token starting at character ``at``, or the one holding it."""
    i = int(np.searchsorted(starts, at, side="left"))
    if i == len(starts) or starts[i] != at:
        i -= 1
    return max(i, 0)


def _choose_end(
    levels: np.ndarray, latest: np.ndarray, s: int, e_max: int, overlap: int, tail: int
) -> tuple[int, int]:
    """Where the chunk starting at token ``s`` ends (exclusive, at most ``e_max``), and where
    the next one starts.

    Both must fall between characters, and the next start after ``s`` so chunks advance. The
    next start is ``end - overlap`` unless that is inside a character (byte tokens of CJK text):
    then it moves back to the character's first token, so the overlap only ever grows. Within
    the last ``tail`` tokens the best boundary wins; elsewhere, the latest allowed end.
    """
    ends = np.arange(s + 1, e_max + 1)
    end_level = levels[ends]
    starts = latest[np.maximum(ends - overlap, 0)]
    ok = (end_level > _INSIDE_CHAR) & (starts > s)
    if not ok.any():
        raise MemextError(
            f"cannot cut the text between characters near token {s}: a chunk of "
            f"{e_max - s} tokens with an overlap of {overlap} cannot advance by a whole "
            "character (a character can take up to 4 byte tokens); raise max_tokens or lower "
            "overlap"
        )
    exact = starts == ends - overlap
    preferred = ok & (ends >= e_max - tail)
    if tail > 0 and preferred.any():
        # boundary quality first, then an exact overlap, then a next start at a word
        key = np.where(preferred, 4 * end_level + 2 * exact + (levels[starts] >= _WORD), -1)
    else:
        key = np.where(ok, exact, -1)
    best = len(key) - 1 - int(np.argmax(key[::-1]))  # the latest among the best
    return int(ends[best]), int(starts[best])
