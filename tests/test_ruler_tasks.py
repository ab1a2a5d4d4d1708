"""The RULER-style generators (``memext.data.ruler``): deterministic by seed, the prompt exactly
the requested length, needles at the requested depth to the token, answers that are what the
prompt says, and exact-match scoring that rejects any wrong answer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memext.data.filler import Filler
from memext.data.ruler import NIAH_QUESTION
from memext.data.tasks import make_samples, score_answer
from memext.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
FILLER = Filler.from_text(TOK, "The grass is green. The sky is blue. ")
RULER = ("niah", "multi_value", "variable_tracking", "common_words")


def _text(ids: np.ndarray) -> str:
    return TOK.decode(ids.tolist())


@pytest.mark.parametrize("task", RULER)
def test_deterministic_by_seed_and_exact_length(task: str) -> None:
    a = make_samples(task, TOK, FILLER, 600, 0.5, 3, seed=7)
    b = make_samples(task, TOK, FILLER, 600, 0.5, 3, seed=7)
    c = make_samples(task, TOK, FILLER, 600, 0.5, 3, seed=8)
    assert a == b and a != c
    assert all(s.prompt.size == 600 and s.task == task for s in a)


@settings(max_examples=25, deadline=None)
@given(depth=st.floats(0, 1), length=st.integers(200, 900), gap=st.integers(0, 60))
def test_niah_needle_sits_at_depth_token_exactly(depth: float, length: int, gap: int) -> None:
    needle, question = "\nThe secret code is {value}, remember.\n", "\nThe secret code is "
    (s,) = make_samples(
        "niah", TOK, FILLER, length, depth, 1, seed=1, gap=gap, needle=needle, question=question
    )
    head = TOK.encode("\nThe secret code is ")
    sentence = len(head) + 5 + len(TOK.encode(", remember.\n"))
    free = length - len(TOK.encode(question)) - gap - sentence
    start = round(depth * free)
    assert s.key_positions == (start + len(head),)
    assert _text(s.prompt[start : start + sentence]) == needle.format(value=s.meta["value"])
    assert _text(s.answer) == str(s.meta["value"])
    assert _text(s.prompt).endswith(question)
    assert s.meta["distance"] >= gap + len(TOK.encode(question))


def test_niah_default_question_and_bad_templates() -> None:
    (s,) = make_samples("niah", TOK, FILLER, 300, 0.0, 1, seed=0)
    assert _text(s.prompt).endswith(NIAH_QUESTION)
    with pytest.raises(ValueError, match="exactly once"):
        make_samples("niah", TOK, FILLER, 300, 0.0, 1, seed=0, needle="no value here")
    with pytest.raises(ValueError, match="question is empty"):
        make_samples("niah", TOK, FILLER, 300, 0.0, 1, seed=0, question="")
    with pytest.raises(ValueError, match="too short"):
        make_samples("niah", TOK, FILLER, 40, 0.0, 1, seed=0)


def test_multi_value_answers_every_key_in_order_of_appearance() -> None:
    for seed in range(5):
        (s,) = make_samples("multi_value", TOK, FILLER, 700, 0.3, 1, seed=seed, n_values=3)
        text, name = _text(s.prompt), s.meta["name"]
        keys = s.meta["keys"]
        found = [text.index(f"The pass key of {name} is {k}.") for k in keys]
        assert found == sorted(found) and len(set(keys)) == 3
        assert _text(s.answer) == ", ".join(map(str, keys))
        assert [_text(s.prompt[p : p + 5]) for p in s.key_positions] == list(map(str, keys))


def test_variable_tracking_chain_is_in_order_and_answer_names_it() -> None:
    for depth in (0.0, 0.5, 1.0):
        (s,) = make_samples("variable_tracking", TOK, FILLER, 800, depth, 1, seed=3, hops=3)
        text, names, value = _text(s.prompt), s.meta["names"], s.meta["value"]
        lines = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 3)
        ]
        where = [text.index(line) for line in lines]
        assert where == sorted(where)
        assert _text(s.answer) == " ".join(names)
        assert f"Which variables hold the value {value}?" in text


def test_common_words_counts_and_answer() -> None:
    (s,) = make_samples("common_words", TOK, None, 900, 0.0, 1, seed=2, n_common=3)
    body = _text(s.prompt).split("\nWhat are")[0]
    words = [w.strip() for w in body.split(",") if w.strip()]
    counts = {w: words.count(w) for w in set(words)}
    common = s.meta["words"]
    k = s.meta["repeats"]
    assert k >= 2 and all(counts[w] == k for w in common)
    assert all(c == 1 for w, c in counts.items() if w not in common)
    assert _text(s.answer) == " ".join(sorted(common)) and common == sorted(common)
    assert s.meta["depth"] is None


@pytest.mark.parametrize("task", RULER)
def test_scorer_accepts_the_answer_and_rejects_any_change(task: str) -> None:
    (s,) = make_samples(task, TOK, FILLER, 600, 0.5, 1, seed=4)
    assert score_answer(s, s.answer)
    for i in range(s.answer.size):
        wrong = s.answer.copy()
        wrong[i] = (wrong[i] + 1) % 256
        assert not score_answer(s, wrong)
    assert not score_answer(s, s.answer[:-1])


@settings(max_examples=30, deadline=None)
@given(
    task=st.sampled_from(["niah", "multi_value", "variable_tracking"]),
    depth=st.floats(0, 1),
    gap=st.integers(0, 100),
    seed=st.integers(0, 2**32),
)
def test_every_asked_piece_ends_at_least_gap_before_the_question(
    task: str, depth: float, gap: int, seed: int
) -> None:
    (s,) = make_samples(task, TOK, FILLER, 500 + gap, depth, 1, seed=seed, gap=gap)
    text = _text(s.prompt)
    question = text.rindex("\nWh")  # every question starts with a line "What ..."/"Which ..."
    values = {
        "niah": [str(s.meta.get("value"))],
        "multi_value": [str(k) for k in s.meta.get("keys", [])],
        "variable_tracking": s.meta.get("names", []),
    }[task]
    for pos, value in zip(s.key_positions, values, strict=True):
        assert text[pos : pos + len(value)] == value
        assert question - (pos + len(value)) >= gap


@pytest.mark.parametrize("task", ["passkey", "needle", "assoc_recall", "copy", *RULER])
def test_a_length_too_short_for_the_task_is_its_own_error(task: str) -> None:
    from memext.data.tasks import TooShort

    with pytest.raises(TooShort, match=r"too short|no room"):
        make_samples(task, TOK, FILLER, 30, 0.5, 1, seed=0, gap=10)
