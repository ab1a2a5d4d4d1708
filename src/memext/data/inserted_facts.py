"""Verifiable questions over real documents: an invented fact inserted at a sentence boundary at
a random depth, a question that only that fact answers, and SQuAD-style scores.

A fact names an invented entity ("the cobalt-heron relay") and gives it a random value (a
five-digit code or a person's name). Neither the entity nor the value occurs in the document
(checked, and drawn again if they do), so a reader cannot guess the answer from the document or
from what it learned in training: it must find the inserted sentence. Everything is a pure
function of (seed, document id), so a benchmark's questions are the same on every machine.

Scores, as SQuAD v1.1's evaluation script defines them (Rajpurkar et al. 2016): an answer is
normalised (lower case, punctuation and the articles a/an/the removed, whitespace collapsed);
exact match is equality after normalisation; token F1 is the harmonic mean of precision and
recall of the normalised answer's tokens against the gold's (bags of tokens). No package in this
environment ships that script, so it is written out here (tests check it on worked examples).

What is scored of a reply (``InsertedFact.score``). A small chat model answers in a sentence
that restates the question ("The onyx-crane board was given the serial number 13341."), which
strict SQuAD exact match counts as wrong. So the scored answer is the reply's first non-empty
line with every word of the question and of the fact's wording removed (the fact's words less
its value, so the value itself is never removed): of that sentence, "13341". Anything else the
reply says stays and breaks exact match. The strict score (the whole first line) and whether
the value occurs in the reply at all (``contains``) are reported beside it.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from memext.errors import MemextError

_ADJECTIVES = (
    "amber", "azure", "brass", "cedar", "cobalt", "copper", "crimson", "dusky", "ember",
    "flint", "frosted", "gilded", "granite", "hollow", "indigo", "ivory", "jade", "juniper",
    "lunar", "marble", "misty", "ochre", "onyx", "opal", "pewter", "quartz", "russet",
    "saffron", "silver", "slate", "tawny", "umber", "velvet", "violet", "willow", "zinc",
)  # fmt: skip
_ANIMALS = (
    "badger", "bison", "crane", "falcon", "ferret", "gecko", "heron", "ibis", "jackal",
    "kestrel", "lemur", "lynx", "marten", "newt", "ocelot", "osprey", "otter", "panther",
    "pelican", "puffin", "quail", "raven", "salamander", "sparrow", "stoat", "tapir", "toucan",
    "vole", "walrus", "wombat", "yak", "zebra",
)  # fmt: skip
_THINGS = ("relay", "daemon", "gateway", "console", "board", "bridge", "probe", "switch")
_FIRST = (
    "Adaeze", "Bertil", "Caoimhe", "Dragan", "Eitan", "Fenna", "Gaspard", "Hilde", "Ilkka",
    "Jovana", "Kasimir", "Liesel", "Mirela", "Nandor", "Odile", "Pekka", "Quirina", "Radek",
    "Solveig", "Tancredi", "Ulla", "Vesna", "Wendelin", "Ximena", "Yannick", "Zdenka",
)  # fmt: skip
_LAST = (
    "Abernathy", "Brannigan", "Castellanos", "Dunmore", "Eriksdottir", "Fairweather",
    "Gallardo", "Halloran", "Ishikawa", "Jankowski", "Kilbride", "Lindqvist", "Marchetti",
    "Nakashima", "Oyelaran", "Pemberton", "Quintero", "Rasmussen", "Szabo", "Thorvaldsen",
    "Underhill", "Valdivia", "Whitlock", "Yevtushenko", "Zaragoza",
)  # fmt: skip

#: (kind, fact, question): ``{entity}`` and ``{value}`` are filled in; a kind says what the
#: value is ("number": five digits, "name": a first and a last name).
TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("number", "The maintenance code of the {entity} is {value}.",
     "What is the maintenance code of the {entity}?"),
    ("number", "The {entity} was given the serial number {value}.",
     "What serial number was the {entity} given?"),
    ("name", "The {entity} is looked after by {value}.",
     "Who looks after the {entity}?"),
    ("name", "The engineer on call for the {entity} is {value}.",
     "Who is the engineer on call for the {entity}?"),
)  # fmt: skip

# Where a sentence may go: after a sentence's end (before a capital letter) or a blank line.
_BOUNDARY = re.compile(r"(?<=[.!?])[ \t]+(?=[A-Z])|\n[^\S\n]*\n\s*")


@dataclass(frozen=True)
class InsertedFact:
    """One question: ``text`` is the document with ``fact`` at ``text[start:start+len(fact)]``,
    inserted at offset ``at`` of the original document (a space before or after the fact where
    the document had none there).

    ``depth`` is where the fact sits, ``start / len(text)``; ``target_depth`` is the depth drawn
    (the fact goes to the sentence boundary nearest to it)."""

    doc_id: str
    text: str
    fact: str
    question: str
    answer: str
    kind: str
    entity: str
    at: int
    start: int
    depth: float
    target_depth: float

    def meta(self) -> dict[str, Any]:
        """Everything but the text: what a result row records."""
        return {k: v for k, v in asdict(self).items() if k != "text"}

    def score(self, reply: str) -> dict[str, Any]:
        """The reply's scores against the answer: ``em`` and ``f1`` of the scored answer (the
        first line less the question's and the fact's words), ``em_strict`` of the first line
        as it is, and ``contains``; ``scored`` is the scored answer."""
        line = first_line(reply)
        frame = self.fact.replace(self.answer, " ")
        scored = strip_words(line, self.question, frame)
        return {
            "scored": scored,
            "em": exact_match(scored, self.answer),
            "f1": token_f1(scored, self.answer),
            "em_strict": exact_match(line, self.answer),
            "contains": contains_answer(reply, self.answer),
        }


def boundaries(text: str) -> list[int]:
    """Character offsets where a sentence can be inserted: the start, after each sentence's end
    (its following spaces kept before the insertion), after each blank line, and the end."""
    found = {0, len(text)}
    found.update(m.end() for m in _BOUNDARY.finditer(text))
    return sorted(found)


def _absent(text: str, *words: str) -> bool:
    low = text.lower()
    return all(w.lower() not in low for w in words)


def draw_fact(text: str, rng: random.Random) -> tuple[str, str, str, str, str]:
    """(kind, fact, question, answer, entity) for ``text``: an entity and a value neither of
    which ``text`` contains."""
    for _ in range(1000):
        kind, fact, question = rng.choice(TEMPLATES)
        entity = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_ANIMALS)} {rng.choice(_THINGS)}"
        if kind == "number":
            value = str(rng.randrange(10_000, 100_000))
        else:
            value = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if _absent(text, entity, value, *value.split()):
            return (
                kind,
                fact.format(entity=entity, value=value),
                question.format(entity=entity),
                value,
                entity,
            )
    raise MemextError("could not draw a fact whose entity and value are absent from the text")


def insert_fact(
    doc_id: str, text: str, seed: int | str = 0, depth: float | None = None
) -> InsertedFact:
    """``text`` with an invented fact at the sentence boundary nearest ``depth`` (a fraction of
    its characters; None: drawn uniformly), and the question it answers. Deterministic in
    (``seed``, ``doc_id``)."""
    if not text.strip():
        raise MemextError(f"document {doc_id!r} is empty: no place for a fact")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise MemextError(f"depth={depth} is invalid: expected a fraction in [0, 1]")
    # A string seed: random.Random hashes it with SHA-512, the same in every process.
    rng = random.Random(f"inserted-facts:{seed}:{doc_id}")
    target = rng.random() if depth is None else depth
    kind, fact, question, answer, entity = draw_fact(text, rng)
    cuts = boundaries(text)
    at = min(cuts, key=lambda c: (abs(c - target * len(text)), c))
    before, after = text[:at], text[at:]
    # The fact is a sentence of its own: a space on either side where the text has none.
    lead = "" if not before or before[-1].isspace() else " "
    trail = "" if not after or after[0].isspace() else " "
    new = before + lead + fact + trail + after
    start = len(before) + len(lead)
    return InsertedFact(
        doc_id=doc_id,
        text=new,
        fact=fact,
        question=question,
        answer=answer,
        kind=kind,
        entity=entity,
        at=at,
        start=start,
        depth=start / len(new),
        target_depth=target,
    )


def fact_questions(
    docs: Sequence[tuple[str, str]], n: int, seed: int | str = 0
) -> list[InsertedFact]:
    """``n`` questions over ``docs`` ((id, text) pairs), one per document, in order (cycling
    through the documents, with another draw each round, when ``n`` exceeds them)."""
    if n < 1:
        raise MemextError(f"n={n} is invalid: expected >= 1")
    if not docs:
        raise MemextError("no documents to insert facts into")
    out = []
    for i in range(n):
        doc_id, text = docs[i % len(docs)]
        round_ = i // len(docs)
        out.append(insert_fact(doc_id, text, seed if round_ == 0 else f"{seed}/{round_}"))
    return out


# --- scores (SQuAD v1.1) -----------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD v1.1)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (bags of tokens); 1.0
    when both are empty, 0.0 when only one is."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold occurs in the normalised prediction as whole tokens: a
    reader that answers in a sentence ("The code is 48213.") still found the fact."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    return float(bool(ref) and f" {ref} " in f" {pred} ")


def strip_words(prediction: str, *texts: str) -> str:
    """The normalised ``prediction`` less every token that occurs in one of ``texts``
    (normalised the same way)."""
    drop = {w for t in texts for w in normalize_answer(t).split()}
    return " ".join(w for w in normalize_answer(prediction).split() if w not in drop)


def first_line(answer: str) -> str:
    """What is scored of a generated answer: its first non-empty line, stripped (a chat model
    often adds an explanation after the answer)."""
    for line in answer.splitlines():
        if line.strip():
            return line.strip()
    return ""
