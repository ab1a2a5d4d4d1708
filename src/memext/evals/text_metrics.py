"""Scores of generated text against references: ROUGE (``rouge-score``) and BLEU and chrF
(``sacrebleu``), both offline.

Every score is on a 0-100 scale, as papers report them (LED's arXiv ROUGE-1 of 46.2):

- ``rouge``: the mean over pairs of ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score's
  default tokenizer: lowercase, split on anything not a letter or digit; no stemming, so a
  score reads words as the task wrote them). ROUGE-L is the sentence-level LCS, not ``rougeLsum``.
- ``bleu`` and ``chrf``: corpus-level, one reference per prediction, sacrebleu's defaults (BLEU:
  13a tokenization, 4-grams, brevity penalty; chrF: character 6-grams, beta 2).
"""

from __future__ import annotations

from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: one each"
        )
    if not predictions:
        raise ValueError("no predictions to score")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{rouge1, rouge2, rougeL}: mean F-measure x 100 over the pairs."""
    from rouge_score.rouge_scorer import RougeScorer

    _pairs(predictions, references)
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        # rouge-score's argument order is (target, prediction).
        scores = scorer.score(ref, pred)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * v / len(predictions) for name, v in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of ``predictions`` against one reference each."""
    from sacrebleu.metrics import BLEU

    _pairs(predictions, references)
    return float(BLEU().corpus_score(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100) of ``predictions`` against one reference each."""
    from sacrebleu.metrics import CHRF

    _pairs(predictions, references)
    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L, BLEU and chrF of the same pairs, in one mapping."""
    return {
        **rouge(predictions, references),
        "bleu": bleu(predictions, references),
        "chrf": chrf(predictions, references),
    }
