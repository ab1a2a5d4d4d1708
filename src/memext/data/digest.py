"""Summarization-style tasks whose answer needs the whole input: ``digest`` lists the facts
scattered through a long document, in order.

SCROLLS found that a long-input model barely beats a truncated one when the needed information
sits early in the input. Here it sits at uniform depths: a reader of the first quarter of the
document sees about a quarter of the facts, so a prefix (Lead) baseline is bounded by the share
of the input it reads. Built like ``memext.data.tasks`` (token space, exact placement, seeded)
and registered in its ``TASKS``; a decoder-only model reads prompt + answer, an encoder-decoder
reads the prompt as its source and writes the answer as its target.
"""

from __future__ import annotations

import numpy as np

from memext.data.filler import Filler
from memext.data.tasks import (
    Sample,
    Seed,
    TooShort,
    _check,
    _haystack,
    _ids,
    _needed,
    _rng,
    _sample,
    register_task,
)
from memext.tokenizer import Tokenizer

DIGEST_FACT = "\nFact {n}: {word}.\n"
DIGEST_QUESTION = "\nThe facts, in order: "
# Short distinct lowercase words: a fact's word is one ROUGE token (rouge-score splits on
# anything not a letter or digit), so ROUGE-1 counts facts.
DIGEST_WORDS = (
    "amber", "anchor", "apple", "arrow", "badger", "basil", "beacon", "birch",
    "bison", "blossom", "cactus", "candle", "canyon", "cedar", "cobalt", "comet",
    "coral", "cotton", "crane", "delta", "falcon", "fern", "fjord", "garnet",
    "glacier", "harbor", "hazel", "heron", "indigo", "iris", "jasper", "juniper",
    "kettle", "lantern", "lemon", "lynx", "maple", "marble", "meadow", "mango",
    "nickel", "nutmeg", "oasis", "olive", "orchid", "otter", "pebble", "pepper",
    "quartz", "quill", "raven", "ribbon", "saffron", "salmon", "sparrow", "tundra",
    "tulip", "velvet", "violet", "walnut", "willow", "yarrow", "zephyr", "zinc",
)  # fmt: skip


@register_task("digest")
def digest(
    tok: Tokenizer,
    filler: Filler,
    length: int,
    depth: float,
    seed: Seed,
    gap: int = 0,
    min_facts: int = 2,
    max_facts: int = 6,
) -> Sample:
    """k facts "Fact n: WORD." (k drawn in [min_facts, max_facts], words distinct) in filler,
    then the question; the answer is the k words in document order, joined by spaces.

    Uniform depths: with ``free`` = the body before the gap less the k sentences, fact i
    (0-based) starts ``round((i + depth) * free / k)`` tokens after the sentences before it, so
    each fact sits at ``depth`` of its own k-th of the document. ``key_positions``: each word's
    start. ``meta["question_tokens"]``: the question's length (a prefix baseline keeps it);
    ``items``, ``item_ends`` and ``joiner``: the words and where each one's sentence shows it
    whole (the word and the token after it), for ``memext.evals.seq2seq.oracle_answer``.
    """
    _check(length, depth, gap, _needed(filler, "digest"))
    if not 1 <= min_facts <= max_facts <= len(DIGEST_WORDS):
        raise ValueError(
            f"min_facts={min_facts}, max_facts={max_facts}: need 1 <= min_facts <= max_facts "
            f"<= {len(DIGEST_WORDS)}"
        )
    rng = _rng(seed, "digest")
    k = int(rng.integers(min_facts, max_facts + 1))
    words = [DIGEST_WORDS[i] for i in rng.choice(len(DIGEST_WORDS), k, replace=False)]
    heads, tails, word_ids = [], [], []
    for n, word in enumerate(words, start=1):
        head, tail = DIGEST_FACT.format(n=n, word="\0").split("\0")
        heads.append(_ids(tok, head))
        tails.append(_ids(tok, tail))
        word_ids.append(_ids(tok, word))
    sentences = [np.concatenate(p) for p in zip(heads, word_ids, tails, strict=True)]
    question = _ids(tok, DIGEST_QUESTION)
    body_len = length - question.size
    free = body_len - gap - sum(s.size for s in sentences)
    if free < 0:
        raise TooShort(
            f"length={length} is too short: {k} facts ({length - question.size - gap - free} "
            f"tokens), the question ({question.size}) and gap={gap} do not fit"
        )
    starts, used = [], 0
    for i, sentence in enumerate(sentences):
        starts.append(used + round((i + depth) * free / k))
        used += sentence.size
    body = _haystack(filler, rng, body_len, list(zip(starts, sentences, strict=True)))
    sep = _ids(tok, " ")
    answer = np.concatenate([x for i, w in enumerate(word_ids) for x in ((sep, w) if i else (w,))])
    meta = {
        "depth": depth,
        "gap": gap,
        "words": words,
        "n_facts": k,
        "question_tokens": int(question.size),
        "chance": float(len(DIGEST_WORDS)) ** -k,
    }
    positions = tuple(s + h.size for s, h in zip(starts, heads, strict=True))
    ends = [p + w.size + 1 for p, w in zip(positions, word_ids, strict=True)]
    meta |= {"items": words, "item_ends": ends, "joiner": " "}
    return _sample("digest", np.concatenate([body, question]), answer, positions, meta)
