"""Evaluation: bits-per-byte against context length (more tasks arrive with later issues)."""

from memext.evals.perplexity import evaluate_lengths, score_length

__all__ = ["evaluate_lengths", "score_length"]
