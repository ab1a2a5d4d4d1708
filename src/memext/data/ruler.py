"""More needle tasks, in the manner of RULER (Hsieh et al. 2024), written from its descriptions:
a configurable single needle, a multi-value needle, variable tracking and common-words
extraction. Built like ``memext.data.tasks`` (token space, exact placement, seeded) and
registered in its ``TASKS`` (one registry for every generator) so ``make_samples`` makes them by
name.
"""

from __future__ import annotations

import string

import numpy as np

from memext.data.filler import Filler
from memext.data.tasks import (
    KEY_HIGH,
    KEY_LOW,
    NEEDLE_NAMES,
    Sample,
    Seed,
    TooShort,
    _check,
    _haystack,
    _ids,
    _needed,
    _rng,
    _sample,
    _scatter,
    _spaces,
    _start,
    register_task,
)
from memext.tokenizer import Tokenizer

NIAH_NEEDLE = "\nThe special magic number is {value}.\n"
NIAH_QUESTION = "\nWhat is the special magic number? The special magic number is "


def _word(rng: np.random.Generator, size: int, letters: str = string.ascii_lowercase) -> str:
    return "".join(letters[i] for i in rng.integers(0, len(letters), size))


def _distinct_words(rng: np.random.Generator, n: int, size: int, letters: str) -> list[str]:
    words: dict[str, None] = {}
    while len(words) < n:
        words[_word(rng, size, letters)] = None
    return list(words)


def _ordered(rng: np.random.Generator, sizes: list[int], lo: int, hi: int, what: str) -> list[int]:
    """Random non-overlapping starts in [lo, hi) for blocks kept in the given order."""
    slack = hi - lo - sum(sizes)
    if slack < 0:
        raise TooShort(f"too short: {what} ({sum(sizes)} tokens) need more than {hi - lo}")
    offsets = np.sort(rng.integers(0, slack + 1, size=len(sizes)))
    starts, used = [], 0
    for size, offset in zip(sizes, offsets, strict=True):
        starts.append(lo + int(offset) + used)
        used += size
    return starts


@register_task("niah")
def niah(
    tok: Tokenizer,
    filler: Filler,
    length: int,
    depth: float,
    seed: Seed,
    gap: int = 0,
    needle: str = NIAH_NEEDLE,
    question: str = NIAH_QUESTION,
) -> Sample:
    """One needle sentence (``needle`` with ``{value}``, a 5-digit number) at ``depth`` of the
    haystack, then ``question``; the answer is the number."""
    _check(length, depth, gap, _needed(filler, "niah"))
    if needle.count("{value}") != 1:
        raise ValueError(f"needle {needle!r} must contain '{{value}}' exactly once")
    if not question:
        raise ValueError("question is empty: the model must be asked for the needle")
    rng = _rng(seed, "niah")
    value = int(rng.integers(KEY_LOW, KEY_HIGH))
    digits = _ids(tok, str(value))
    head_text, tail_text = needle.split("{value}")
    head, tail = _ids(tok, head_text), _ids(tok, tail_text)
    sentence = np.concatenate([head, digits, tail])
    asked = _ids(tok, question)
    start = _start(length, depth, gap, sentence.size, asked.size, "the needle")
    body = _haystack(filler, rng, length - asked.size, [(start, sentence)])
    meta = {"depth": depth, "gap": gap, "value": value, "chance": 1 / (KEY_HIGH - KEY_LOW)}
    return _sample("niah", np.concatenate([body, asked]), digits, (start + head.size,), meta)


@register_task("multi_value")
def multi_value(
    tok: Tokenizer,
    filler: Filler,
    length: int,
    depth: float,
    seed: Seed,
    n_values: int = 4,
    gap: int = 0,
) -> Sample:
    """``n_values`` sentences "The pass key of <name> is NNNNN." for one name; the first at
    ``depth``, the others anywhere else before the question. The answer: every key, in the order
    they appear, joined by ", "."""
    _check(length, depth, gap, _needed(filler, "multi_value"))
    if n_values < 1:
        raise ValueError(f"n_values={n_values} must be positive")
    rng = _rng(seed, "multi_value")
    name = NEEDLE_NAMES[int(rng.integers(0, len(NEEDLE_NAMES)))]
    keys = [int(k) + KEY_LOW for k in rng.choice(KEY_HIGH - KEY_LOW, n_values, replace=False)]
    digits = [_ids(tok, str(k)) for k in keys]
    head, tail = _ids(tok, f"\nThe pass key of {name} is "), _ids(tok, ".\n")
    sentences = [np.concatenate([head, d, tail]) for d in digits]
    question = _ids(tok, f"\nWhat are all the pass keys of {name}? The pass keys of {name} are ")
    body_len = length - question.size
    start = _start(length, depth, gap, sentences[0].size, question.size, "the first key")
    # Every value is asked for, so every one must end ``gap`` tokens before the question.
    regions = [(0, start), (start + sentences[0].size, body_len - gap)]
    try:
        others = _scatter(rng, [s.size for s in sentences[1:]], regions)
    except ValueError as e:
        raise TooShort(f"length={length} is too short for {n_values} values: {e}") from None
    starts = [start, *others]
    body = _haystack(filler, rng, body_len, list(zip(starts, sentences, strict=True)))
    order = np.argsort(starts, kind="stable")
    comma = _ids(tok, ", ")
    answer = np.concatenate(
        [x for i, j in enumerate(order) for x in ([comma] if i else []) + [digits[j]]]
    )
    meta = {
        "depth": depth,
        "gap": gap,
        "name": name,
        "keys": [keys[j] for j in order],
        "chance": (1 / (KEY_HIGH - KEY_LOW)) ** n_values,
    }
    positions = tuple(starts[j] + head.size for j in order)
    return _sample("multi_value", np.concatenate([body, question]), answer, positions, meta)


@register_task("variable_tracking")
def variable_tracking(
    tok: Tokenizer,
    filler: Filler,
    length: int,
    depth: float,
    seed: Seed,
    hops: int = 4,
    gap: int = 0,
) -> Sample:
    """A chain "VAR A = 12345." "VAR B = VAR A." ... of ``hops`` assignments, the first at
    ``depth``, the rest in order at random places after it; asked which variables hold the
    value, the answer is every name in chain order, joined by " "."""
    _check(length, depth, gap, _needed(filler, "variable_tracking"))
    if hops < 1:
        raise ValueError(f"hops={hops} must be positive")
    rng = _rng(seed, "variable_tracking")
    value = int(rng.integers(KEY_LOW, KEY_HIGH))
    names = _distinct_words(rng, hops, 5, string.ascii_uppercase)
    name_ids = [_ids(tok, n) for n in names]
    var, eq, end = _ids(tok, "\nVAR "), _ids(tok, " = "), _ids(tok, ".\n")
    first = np.concatenate([var, name_ids[0], eq, _ids(tok, str(value)), end])
    links = [
        np.concatenate([var, name_ids[i], eq, var[1:], name_ids[i - 1], end])
        for i in range(1, hops)
    ]
    question = _ids(tok, f"\nWhich variables hold the value {value}? In order, they are: ")
    body_len = length - question.size
    # The first assignment sits at ``depth`` of the room the whole chain leaves free, so the
    # later links (which must follow it) always fit after it.
    chain = first.size + sum(s.size for s in links)
    start = _start(length, depth, gap, chain, question.size, "the chain of assignments")
    rest = _ordered(
        rng, [s.size for s in links], start + first.size, body_len - gap, "the other assignments"
    )
    starts = [start, *rest]
    body = _haystack(filler, rng, body_len, list(zip(starts, [first, *links], strict=True)))
    space = _ids(tok, " ")
    answer = np.concatenate(
        [x for i, n in enumerate(name_ids) for x in ([space] if i else []) + [n]]
    )
    meta = {"depth": depth, "gap": gap, "hops": hops, "names": names, "value": value}
    meta["chance"] = float(26.0 ** (-5 * hops))
    positions = tuple(s + var.size for s in starts)
    return _sample("variable_tracking", np.concatenate([body, question]), answer, positions, meta)


@register_task("common_words")
def common_words(
    tok: Tokenizer,
    length: int,
    seed: Seed,
    n_common: int = 5,
    filler: Filler | None = None,
    depth: float = 0.0,
    gap: int = 0,
) -> Sample:
    """A list of 5-letter words filling the prompt, in which ``n_common`` words each appear
    ``k >= 2`` times (about half the list) and every other word once; asked for the most common
    words, the answer is those, in alphabetical order, joined by " ". ``depth``/``filler`` are
    accepted for a uniform interface: the list fills the prompt, so there is no depth."""
    _check(length, depth, gap, filler)
    if n_common < 1:
        raise ValueError(f"n_common={n_common} must be positive")
    rng = _rng(seed, "common_words")
    question = _ids(
        tok,
        f"\nWhat are the {n_common} most common words in the list above, in alphabetical "
        "order? They are: ",
    )
    body_len = length - question.size
    item = _ids(tok, " abcde,").size  # a list item's size (exact for the byte tokenizer)
    est = body_len // item
    k = max(2, est // (2 * n_common))
    if n_common * k * item > body_len:
        raise TooShort(
            f"length={length} is too short for {n_common} common words repeated {k} times"
        )
    common = _distinct_words(rng, n_common, 5, string.ascii_lowercase)
    items = [w for w in common for _ in range(k)]
    room = body_len - sum(_ids(tok, f" {w},").size for w in items)
    seen = set(common)
    while True:
        w = _word(rng, 5)
        if w in seen:
            continue
        size = _ids(tok, f" {w},").size
        if size > room:
            break
        seen.add(w)
        items.append(w)
        room -= size
    rng.shuffle(items)
    body = [_spaces(tok, filler).take(room, rng)]
    first: dict[str, int] = {}
    pos = room
    for w in items:
        ids = _ids(tok, f" {w},")
        if w in common and w not in first:
            first[w] = pos
        body.append(ids)
        pos += ids.size
    truth = sorted(common)
    answer = _ids(tok, " ".join(truth))
    meta = {"depth": None, "gap": gap, "words": truth, "repeats": k, "items": len(items)}
    meta["chance"] = 0.0
    positions = tuple(first[w] for w in truth)
    return _sample("common_words", np.concatenate([*body, question]), answer, positions, meta)
