"""ROUGE, BLEU and chrF against values worked out by hand from their definitions."""

from __future__ import annotations

import math

import pytest

from memext.evals.text_metrics import bleu, chrf, rouge, text_scores


def test_rouge_known_values() -> None:
    preds = ["the cat sat", "a b c d"]
    refs = ["the cat sat on the mat", "d c b a"]
    # Pair 1: unigrams 3 of 3 predicted, 3 of 6 in the reference: F = 2/3; bigrams 2 of 2 and
    # 2 of 5: F = 4/7; LCS 3: F = 2/3. Pair 2: unigrams all: F = 1; no common bigram; LCS 1 of
    # 4 both ways: F = 1/4.
    got = rouge(preds, refs)
    want = {
        "rouge1": 100 * (2 / 3 + 1) / 2,
        "rouge2": 100 * (4 / 7 + 0) / 2,
        "rougeL": 100 * (2 / 3 + 1 / 4) / 2,
    }
    assert got == pytest.approx(want, abs=1e-9)


def test_rouge_tokenizes_like_the_package() -> None:
    # Lowercased, split on non-alphanumerics: punctuation and case do not count.
    assert rouge(["Otter, LYNX."], ["otter lynx"])["rougeL"] == pytest.approx(100.0)
    assert rouge([""], ["otter"])["rouge1"] == 0.0


def test_bleu_known_value() -> None:
    # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths: no brevity penalty.
    want = 100 * math.prod([5 / 6, 3 / 5, 2 / 4, 1 / 3]) ** 0.25
    got = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got == pytest.approx(want, abs=1e-4)
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)


def test_chrf_bounds() -> None:
    assert chrf(["otter lynx"], ["otter lynx"]) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == 0.0
    assert 0.0 < chrf(["otter lynx"], ["otter heron"]) < 100.0


def test_text_scores_and_refusals() -> None:
    scores = text_scores(["otter lynx"], ["otter lynx"])
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "bleu", "chrf"}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        bleu([], [])
