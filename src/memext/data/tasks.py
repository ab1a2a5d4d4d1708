"""Synthetic long-range tasks: passkey, multi-key needle, associative recall, copy.

Every sample is built in *token* space: each piece of text is encoded on its own with the run's
tokenizer and the id arrays are concatenated. Placement is therefore exact to the token (a key
asked for at depth 0.5 starts at the token the formula says, whatever the tokenizer), and the
answer is the very ids the key was written with in the haystack, never a re-encoding that a BPE
could merge differently.

Determinism: a sample is a pure function of (tokenizer, filler, arguments, seed); the seed (an int
or a tuple of ints) and the task name seed one ``numpy.random.default_rng``.

``gap``: the asked key ends at least ``gap`` tokens before the question begins, so a model that
only sees the last ``gap`` tokens before the answer cannot read the key directly.
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memext.data.filler import Filler
from memext.registry import Registry
from memext.tokenizer import Tokenizer

Seed = int | tuple[int, ...]

PASSKEY_SENTENCE = ("\nThe pass key is ", ". Remember it. ", " is the pass key.\n")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is "
NEEDLE_NAMES = (
    "red",
    "blue",
    "green",
    "amber",
    "violet",
    "silver",
    "orange",
    "teal",
    "fox",
    "owl",
    "otter",
    "heron",
    "lynx",
    "badger",
    "raven",
    "bison",
)
COPY_OPEN, COPY_CLOSE, COPY_QUESTION = "\nRemember this: ", "\n", "\nCopy: "
COPY_ALPHABET = string.ascii_letters + string.digits
KEY_LOW, KEY_HIGH = 10_000, 100_000  # 5-digit keys, drawn uniformly from [KEY_LOW, KEY_HIGH)


class TooShort(ValueError):
    """The requested length cannot hold the task's pieces and question: a cell that cannot
    exist rather than a mistake (suites skip it)."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One prompt and its answer: ``tokens = prompt + answer`` with the prompt ``answer_start`` long.

    ``key_positions``: where each asked-for key's digits (or value) begin in the prompt.
    ``meta``: task parameters and bookkeeping (depth, length, distance, chance, ...).
    """

    tokens: np.ndarray
    answer_start: int
    key_positions: tuple[int, ...]
    task: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tokens = np.array(self.tokens, dtype=np.int64)  # a private copy, frozen like the rest
        tokens.setflags(write=False)
        object.__setattr__(self, "tokens", tokens)
        if not 0 < self.answer_start < tokens.size:
            raise ValueError(
                f"answer_start={self.answer_start} must leave a non-empty prompt and answer "
                f"in {tokens.size} tokens"
            )

    @property
    def answer(self) -> np.ndarray:
        return self.tokens[self.answer_start :]

    @property
    def prompt(self) -> np.ndarray:
        return self.tokens[: self.answer_start]

    def __eq__(self, other: object) -> bool:
        # The generated __eq__ would compare arrays with ==, which is ambiguous for numpy.
        if not isinstance(other, Sample):
            return NotImplemented
        fields = (self.answer_start, self.key_positions, self.task, self.meta)
        others = (other.answer_start, other.key_positions, other.task, other.meta)
        return fields == others and np.array_equal(self.tokens, other.tokens)

    __hash__ = None  # type: ignore[assignment]  # meta is a mutable dict


# --- shared pieces ------------------------------------------------------------------------------


def _rng(seed: Seed, task: str) -> np.random.Generator:
    seeds = (seed,) if isinstance(seed, int | np.integer) else tuple(seed)
    if not seeds or any(int(s) < 0 for s in seeds):
        raise ValueError(f"seed={seed!r} must be a non-negative int or a tuple of them")
    # crc32 is stable across processes (hash() of a str is not), so the task name can salt it.
    return np.random.default_rng([*map(int, seeds), zlib.crc32(task.encode())])


def _ids(tok: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text), dtype=np.int64)


def _check(length: int, depth: float, gap: int, filler: Filler | None = None) -> None:
    if filler is not None and not isinstance(filler, Filler):
        raise ValueError(f"filler must be a Filler, got {type(filler).__name__}")
    if length < 1:
        raise ValueError(f"length={length} must be positive")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1] (0 = start, 1 = just before the gap)")
    if gap < 0:
        raise ValueError(f"gap={gap} must be non-negative")


def _needed(filler: Filler | None, task: str) -> Filler:
    if filler is None:
        raise ValueError(f"{task} hides its key in prose: pass a Filler (e.g. Filler.stdlib(tok))")
    return filler


def _start(length: int, depth: float, gap: int, block: int, question: int, what: str) -> int:
    """Where a ``block``-token piece starts: ``round(depth * free)`` (Python's round)."""
    free = length - question - gap - block
    if free < 0:
        raise TooShort(
            f"length={length} is too short: {what} ({block} tokens), the question "
            f"({question} tokens) and gap={gap} need at least {block + question + gap}"
        )
    return round(depth * free)


def _haystack(
    filler: Filler, rng: np.random.Generator, size: int, pieces: Sequence[tuple[int, np.ndarray]]
) -> np.ndarray:
    """``size`` tokens: each (start, ids) piece at its start, filler everywhere else."""
    out, pos = [], 0
    for start, ids in sorted(pieces, key=lambda p: p[0]):
        if start < pos:
            raise AssertionError(f"pieces overlap at token {start}")
        out += [filler.take(start - pos, rng), ids]
        pos = start + ids.size
    if pos > size:
        raise AssertionError(f"pieces end at {pos}, past the haystack's {size} tokens")
    out.append(filler.take(size - pos, rng))
    return np.concatenate(out)


def _spaces(tok: Tokenizer, filler: Filler | None) -> Filler:
    # Tasks that need no prose pad with spaces when no filler is given.
    return filler if filler is not None else Filler.from_text(tok, " ")


def _sample(
    task: str,
    prompt: np.ndarray,
    answer: np.ndarray,
    key_positions: tuple[int, ...],
    meta: dict[str, Any],
) -> Sample:
    length = prompt.size
    # distance: from the farthest asked key to the answer, since an exact match needs every key.
    meta = {**meta, "length": length, "distance": length - min(key_positions)}
    return Sample(np.concatenate([prompt, answer]), length, key_positions, task, meta)


# --- the tasks ----------------------------------------------------------------------------------
#: Every generator, by name (``memext.data.ruler`` adds its own): one registry for all of them.
TASKS: Registry[Callable[..., Sample]] = Registry("task")
register_task = TASKS.register


@register_task("passkey")
def passkey(
    tok: Tokenizer, filler: Filler, length: int, depth: float, seed: Seed, gap: int = 0
) -> Sample:
    """A 5-digit pass key hidden in ``length - question`` tokens of filler, then asked for.

    The key sentence starts at ``round(depth * free)``, ``free = length - len(question) - gap -
    len(sentence)``; ``key_positions`` is its first copy of the digits.
    """
    _check(length, depth, gap, _needed(filler, "passkey"))
    rng = _rng(seed, "passkey")
    key = int(rng.integers(KEY_LOW, KEY_HIGH))
    digits = _ids(tok, str(key))  # encoded once: the haystack's two copies and the answer
    head, mid, tail = (_ids(tok, s) for s in PASSKEY_SENTENCE)
    sentence = np.concatenate([head, digits, mid, digits, tail])
    question = _ids(tok, PASSKEY_QUESTION)
    start = _start(length, depth, gap, sentence.size, question.size, "the key sentence")
    body = _haystack(filler, rng, length - question.size, [(start, sentence)])
    meta = {"depth": depth, "gap": gap, "key": key, "chance": 1 / (KEY_HIGH - KEY_LOW)}
    prompt = np.concatenate([body, question])
    return _sample("passkey", prompt, digits, (start + head.size,), meta)


def _scatter(
    rng: np.random.Generator, sizes: Sequence[int], regions: Sequence[tuple[int, int]]
) -> list[int]:
    """Random non-overlapping starts for blocks of ``sizes`` in two free [lo, hi) regions.

    The blocks are shuffled and the first ``j`` go to the first region, the rest to the second,
    with ``j`` drawn among the splits that fit; then each region spreads its blocks at random.
    """
    (lo0, hi0), (lo1, hi1) = regions
    order = [int(i) for i in rng.permutation(len(sizes))]
    prefix = np.cumsum([0, *(sizes[i] for i in order)])
    splits = [j for j, p in enumerate(prefix) if p <= hi0 - lo0 and prefix[-1] - p <= hi1 - lo1]
    if not splits:
        raise ValueError(f"{len(sizes)} more key sentence(s) of {prefix[-1]} tokens do not fit")
    j = splits[int(rng.integers(0, len(splits)))]
    starts = [0] * len(sizes)
    for (lo, hi), blocks in zip(regions, (order[:j], order[j:]), strict=True):
        slack = hi - lo - sum(sizes[i] for i in blocks)
        offsets = np.sort(rng.integers(0, slack + 1, size=len(blocks)))
        used = 0
        for i, offset in zip(blocks, offsets, strict=True):
            starts[i] = lo + int(offset) + used
            used += sizes[i]
    return starts


@register_task("needle")
def needle(
    tok: Tokenizer,
    filler: Filler,
    length: int,
    depth: float,
    seed: Seed,
    n_keys: int = 4,
    gap: int = 0,
) -> Sample:
    """``n_keys`` sentences "The pass key of <name> is NNNNN." in filler; one name is asked.

    The asked sentence sits at ``depth`` exactly as in ``passkey``; the others (distinct names,
    distinct keys) land at random non-overlapping places anywhere before the question.
    """
    _check(length, depth, gap, _needed(filler, "needle"))
    if not 1 <= n_keys <= len(NEEDLE_NAMES):
        raise ValueError(f"n_keys={n_keys} must lie in [1, {len(NEEDLE_NAMES)}]")
    rng = _rng(seed, "needle")
    names = [NEEDLE_NAMES[i] for i in rng.choice(len(NEEDLE_NAMES), n_keys, replace=False)]
    keys = [int(k) + KEY_LOW for k in rng.choice(KEY_HIGH - KEY_LOW, n_keys, replace=False)]
    digits = [_ids(tok, str(k)) for k in keys]
    heads = [_ids(tok, f"\nThe pass key of {name} is ") for name in names]
    tail = _ids(tok, ".\n")
    sentences = [np.concatenate([h, d, tail]) for h, d in zip(heads, digits, strict=True)]
    question = _ids(tok, f"\nWhat is the pass key of {names[0]}? The pass key of {names[0]} is ")
    body_len = length - question.size
    start = _start(length, depth, gap, sentences[0].size, question.size, "the asked sentence")
    regions = [(0, start), (start + sentences[0].size, body_len)]
    try:
        others = _scatter(rng, [s.size for s in sentences[1:]], regions)
    except ValueError as e:
        raise TooShort(
            f"length={length} is too short for {n_keys} key sentences at depth={depth}: {e}"
        ) from None
    starts = [start, *others]
    body = _haystack(filler, rng, body_len, list(zip(starts, sentences, strict=True)))
    meta = {
        "depth": depth,
        "gap": gap,
        "n_keys": n_keys,
        "names": names,
        "keys": keys,
        "sentence_starts": starts,  # the asked one first
        "chance": 1 / (KEY_HIGH - KEY_LOW),
    }
    prompt = np.concatenate([body, question])
    return _sample("needle", prompt, digits[0], (start + heads[0].size,), meta)


def _draw_pairs(rng: np.random.Generator, table: dict[str, str], n: int) -> list[str]:
    """Add ``n`` pairs (3 lowercase letters -> 3 digits) whose keys are new to ``table``."""
    letters, new = string.ascii_lowercase, []
    while len(new) < n:
        if len(table) >= len(letters) ** 3:
            raise ValueError("assoc_recall ran out of distinct 3-letter keys: use a shorter length")
        key = "".join(letters[i] for i in rng.integers(0, len(letters), 3))
        if key not in table:
            table[key] = f"{int(rng.integers(0, 1000)):03d}"
            new.append(key)
    return new


def _fill_pairs(
    rng: np.random.Generator,
    table: dict[str, str],
    asked: list[str],
    size: Callable[[str], int],
    body_len: int,
    gap: int,
) -> tuple[list[str], int]:
    """Pairs that fill ``body_len``: the asked ones shuffled among distractors, then at least
    ``gap`` tokens of distractors only. Returns the order and the spaces left at the start."""
    if gap >= body_len:
        raise TooShort(f"gap={gap} leaves no room in a {body_len}-token body for the pairs")
    tail: list[str] = []
    while sum(map(size, tail)) < gap:
        tail += _draw_pairs(rng, table, 1)
    room = body_len - sum(map(size, tail)) - sum(map(size, asked))
    if room < 0:
        raise TooShort(
            f"the prompt is too short for {len(asked)} asked pair(s) and gap={gap}: "
            f"the body holds {body_len} tokens"
        )
    head = list(asked)
    while True:
        (key,) = _draw_pairs(rng, table, 1)
        if size(key) > room:
            del table[key]  # the first pair that does not fit ends the haystack
            break
        head.append(key)
        room -= size(key)
    rng.shuffle(head)
    return head + tail, room


@register_task("assoc_recall")
def assoc_recall(
    tok: Tokenizer,
    length: int,
    seed: Seed,
    n_pairs: int | None = None,
    n_queries: int = 1,
    gap: int = 0,
    filler: Filler | None = None,
    depth: float = 0.0,
) -> Sample:
    """Key-value pairs "abc=123;" then queries "abc?"; the answer is the asked values, in query
    order, joined by ";" (a single query: just the value).

    With neither ``filler`` nor ``n_pairs`` the pairs fill the prompt (spaces pad the start) and
    every pair in the last ``gap`` tokens before the question is a distractor. Otherwise one
    block of ``n_pairs`` (default 16) pairs is placed at ``depth`` as in ``passkey``, in the
    filler (spaces when there is none). ``key_positions``: the asked values, in query order.
    """
    _check(length, depth, gap, filler)
    fill = filler is None and n_pairs is None
    n_pairs = n_pairs or 16
    if n_queries < 1 or (not fill and n_queries > n_pairs):
        raise ValueError(f"n_queries={n_queries} must lie in [1, n_pairs={n_pairs}]")
    rng = _rng(seed, "assoc_recall")
    eq, sep, ask, newline = (_ids(tok, s) for s in ("=", ";", "?", "\n"))
    table: dict[str, str] = {}
    ids: dict[str, np.ndarray] = {}  # each key and value encoded once, reused everywhere

    def encoded(text: str) -> np.ndarray:
        if text not in ids:
            ids[text] = _ids(tok, text)
        return ids[text]

    def size(key: str) -> int:
        return encoded(key).size + eq.size + encoded(table[key]).size + sep.size

    drawn = _draw_pairs(rng, table, n_queries if fill else n_pairs)
    asked = [drawn[i] for i in rng.choice(len(drawn), n_queries, replace=False)]
    question = np.concatenate([newline, *(x for k in asked for x in (encoded(k), ask))])
    body_len = length - question.size
    edge = newline[:0] if fill else newline  # a line break sets a block off from the filler
    if fill:
        order, start = _fill_pairs(rng, table, asked, size, body_len, gap)
    else:
        order = [drawn[i] for i in rng.permutation(len(drawn))]
        n_block = sum(map(size, order)) + 2 * edge.size
        start = _start(length, depth, gap, n_block, question.size, "the pairs")
    value_at, pos, block = {}, start + edge.size, [edge]
    for key in order:
        value_at[key] = pos + encoded(key).size + eq.size
        block += [encoded(key), eq, encoded(table[key]), sep]
        pos += size(key)
    block.append(edge)
    body = _haystack(_spaces(tok, filler), rng, body_len, [(start, np.concatenate(block))])
    answer: list[np.ndarray] = []
    for key in asked:
        answer += [sep, encoded(table[key])] if answer else [encoded(table[key])]
    meta = {
        "depth": None if fill else depth,
        "gap": gap,
        "n_pairs": len(order),
        "queries": asked,
        "values": [table[k] for k in asked],
        "chance": 1e-3**n_queries,
    }
    prompt = np.concatenate([body, question])
    return _sample(
        "assoc_recall", prompt, np.concatenate(answer), tuple(value_at[k] for k in asked), meta
    )


@register_task("copy")
def copy_task(
    tok: Tokenizer,
    length: int,
    seed: Seed,
    span: int = 16,
    gap: int = 0,
    filler: Filler | None = None,
    depth: float = 0.0,
) -> Sample:
    """A random span of ``span`` letters/digits, filler (spaces when none), then "Copy: "; the
    answer is the span. The span's block sits at ``depth`` as in ``passkey`` (0: the start)."""
    _check(length, depth, gap, filler)
    if span < 1:
        raise ValueError(f"span={span} must be positive")
    rng = _rng(seed, "copy")
    text = "".join(COPY_ALPHABET[i] for i in rng.integers(0, len(COPY_ALPHABET), span))
    ids = _ids(tok, text)
    head, tail, question = (_ids(tok, s) for s in (COPY_OPEN, COPY_CLOSE, COPY_QUESTION))
    block = np.concatenate([head, ids, tail])
    start = _start(length, depth, gap, block.size, question.size, "the span")
    body = _haystack(_spaces(tok, filler), rng, length - question.size, [(start, block)])
    meta = {"depth": depth, "gap": gap, "span": text, "chance": len(COPY_ALPHABET) ** -span}
    prompt = np.concatenate([body, question])
    return _sample("copy", prompt, ids, (start + head.size,), meta)


def make_samples(
    task: str,
    tok: Tokenizer,
    filler: Filler | None,
    length: int,
    depth: float,
    n: int,
    seed: int,
    **kw: Any,
) -> list[Sample]:
    """``n`` samples of ``task``; sample ``i`` is seeded by ``(seed, i)``, so a prefix of a larger
    set is the smaller set."""
    # Checked before the loop, so a bad name or setting fails even when n is 0.
    TASKS.resolve(task, tok=tok, filler=filler, length=length, depth=depth, seed=seed, **kw)
    if n < 0:
        raise ValueError(f"n={n} must be non-negative")
    return [
        TASKS.build(task, tok=tok, filler=filler, length=length, depth=depth, seed=(seed, i), **kw)
        for i in range(n)
    ]


def score_answer(sample: Sample, predicted: Sequence[int]) -> bool:
    """Exact match of the whole answer: a wrong length or any wrong token fails."""
    pred = np.asarray(list(predicted), dtype=np.int64)
    return pred.shape == sample.answer.shape and bool(np.array_equal(pred, sample.answer))
