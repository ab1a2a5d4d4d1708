"""Inserted-fact questions (``memext.data.inserted_facts``): deterministic, the fact where the
record says, absent from the document before; SQuAD-style scores on hand-worked examples."""

from __future__ import annotations

import pytest

from memext.data.inserted_facts import (
    boundaries,
    contains_answer,
    exact_match,
    fact_questions,
    first_line,
    insert_fact,
    normalize_answer,
    token_f1,
)
from memext.errors import MemextError

DOC = (
    "The scheduler picks the next task. It reads the run queue first.\n\n"
    "Locking rules are strict! Each lock has an owner. Nested locks need care?\n"
    "Yes. Interrupts are disabled while the lock is held.\n\n"
    "See also the memory barriers document. It explains ordering in depth. " * 3
)


def test_the_same_seed_gives_the_same_question() -> None:
    a, b = insert_fact("doc-1", DOC, seed=7), insert_fact("doc-1", DOC, seed=7)
    assert a == b
    others = {insert_fact("doc-1", DOC, seed=s).fact for s in range(8)}
    assert len(others) > 1  # another seed, another fact
    assert insert_fact("doc-2", DOC, seed=7) != a  # and another document


@pytest.mark.parametrize("seed", range(12))
def test_the_fact_sits_where_recorded_at_a_sentence_boundary(seed: int) -> None:
    f = insert_fact("doc", DOC, seed=seed)
    assert f.text[f.start : f.start + len(f.fact)] == f.fact
    assert f.depth == pytest.approx(f.start / len(f.text))
    assert f.answer in f.fact and f.entity in f.fact and f.entity in f.question
    assert f.answer not in f.question
    # Nothing else changed: the original before ``at``, at most a space, the fact, at most a
    # space, the original from ``at`` on.
    assert f.text[: f.at] == DOC[: f.at] and f.text[f.at : f.start] in ("", " ")
    rest = f.text[f.start + len(f.fact) :]
    assert rest == DOC[f.at :] or (rest[0] == " " and rest[1:] == DOC[f.at :])
    # At a boundary of the original, the nearest to the depth drawn.
    target = f.target_depth * len(DOC)
    assert f.at in boundaries(DOC)
    assert all(abs(c - target) >= abs(f.at - target) for c in boundaries(DOC))
    # The value and the entity are nowhere in the document before.
    assert f.answer.lower() not in DOC.lower() and f.entity.lower() not in DOC.lower()
    assert f.text.count(f.answer) == 1


def test_depth_given_goes_to_the_nearest_boundary() -> None:
    first = insert_fact("doc", DOC, depth=0.0)
    assert first.start == 0 and first.text.startswith(first.fact + " The scheduler")
    last = insert_fact("doc", DOC, depth=1.0)
    assert last.text.endswith(last.fact) and last.depth > 0.9
    mid = insert_fact("doc", DOC, depth=0.5)
    assert 0.3 < mid.depth < 0.7


def test_a_value_found_in_the_document_is_drawn_again() -> None:
    # Every value the first draw could give is in this text, for names and numbers alike: the
    # generator must keep drawing until both the entity and the value are absent.
    f = insert_fact("doc", DOC, seed=3)
    crowded = DOC + " " + f.answer + " " + f.entity
    g = insert_fact("doc", crowded, seed=3)
    assert g.answer.lower() not in crowded.lower() and g.entity.lower() not in crowded.lower()


def test_bad_input_is_refused_in_one_line() -> None:
    with pytest.raises(MemextError, match="empty"):
        insert_fact("doc", "   ")
    with pytest.raises(MemextError, match=r"depth=1\.5"):
        insert_fact("doc", DOC, depth=1.5)
    with pytest.raises(MemextError, match="n=0"):
        fact_questions([("a", DOC)], 0)
    with pytest.raises(MemextError, match="no documents"):
        fact_questions([], 3)


def test_questions_cycle_through_documents_with_new_draws() -> None:
    qs = fact_questions([("a", DOC), ("b", DOC)], 5, seed=1)
    assert [q.doc_id for q in qs] == ["a", "b", "a", "b", "a"]
    assert qs[0].fact != qs[2].fact  # a second round draws again
    assert qs == fact_questions([("a", DOC), ("b", DOC)], 5, seed=1)


# --- scores -------------------------------------------------------------------------------------


def test_normalisation_as_squad() -> None:
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("onyx-crane") == "onyxcrane"  # punctuation removed, not spaced
    assert normalize_answer("Theory") == "theory"  # "the" only as a word


def test_exact_match_and_f1_hand_worked() -> None:
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # bags: "a a b" vs "a b b": overlap min(2,1) + min(1,2) = 2; P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("nothing alike", "eiffel tower") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "tower") == 0.0  # "the" is empty


def test_contains_whole_tokens_only() -> None:
    assert contains_answer("The code is 41328.", "41328") == 1.0
    assert contains_answer("The code is 413280.", "41328") == 0.0
    assert contains_answer("It is Solveig Abernathy, I think", "solveig abernathy") == 1.0
    assert contains_answer("anything", "") == 0.0


def test_a_reply_is_scored_on_its_first_line_less_the_question() -> None:
    f = insert_fact("doc", DOC, seed=0)
    assert f.score(f"{f.answer}")["em"] == 1.0
    restated = f.score(f"\n{f.fact}\nBecause the context says so.")
    assert restated["em"] == 1.0 and restated["f1"] == 1.0
    assert restated["em_strict"] == 0.0 and restated["contains"] == 1.0
    wrong = f.score("I do not know.")
    assert wrong["em"] == wrong["f1"] == wrong["contains"] == 0.0
    extra = f.score(f"Maybe {f.answer} or 12345")
    assert extra["em"] == 0.0 and 0 < extra["f1"] < 1 and extra["contains"] == 1.0
    assert first_line("\n  \n  first \nsecond") == "first"
