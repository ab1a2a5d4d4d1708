"""The suite results file: its schema, loading with a clear refusal, and the summary of a run.

A results file (``RUN_DIR/eval/<suite>.json``) holds one model's scores on one suite::

    {"format": "memext-suite-results", "schema_version": 1,
     "suite": "longctx", "spec": {...the suite, as run...},
     "model": {"name", "kind" ("memext" | "hf"), "path", "trained_length", "max_context", "params"},
     "corpus": {"name", "hash"}, "seed": 0, "threshold": 0.9,
     "provenance": {...}, "created": ISO time, "seconds": wall time of the cells run now,
     "cells": [{"task", "length", "depth" (or null), "metric", "higher_is_better", "score",
                "n", "chance" (or null), "seconds", ...task extras}],
     "summary": see ``summarize``}

Cells are the unit of work and of resumption: one task at one length (and depth). The ``speed``
task's cells also carry ``tokens_per_s`` and ``peak_bytes``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from memext.errors import MemextError

FORMAT = "memext-suite-results"
SCHEMA_VERSION = 1
DEFAULT_THRESHOLD = 0.9
ACCURACY_METRICS = ("exact_match", "f1", "accuracy")  # scores in [0, 1], higher is better
#: An accuracy task counts toward the overall effective context when the model scores at least
#: this at the task's shortest length: a task it cannot do has no context to keep, and its
#: near-zero scores (noise) would otherwise hold "the threshold of nothing" at every length.
SOLVED = 0.5

EFFECTIVE_CONTEXT = (
    "effective context length: the longest evaluated length L such that at L and at every "
    "shorter evaluated length the score is at least {threshold:.3g} times the model's own score at "
    "its shortest evaluated length (for bits-per-byte, lower is better: the shortest length's "
    "value divided by L's must be at least {threshold:.3g}); the overall figure is the shortest "
    "effective context among the accuracy tasks the model solves (score >= {solved:g}) at their "
    "shortest length, none when it solves none"
)


def load_results(path: str | Path) -> dict[str, Any]:
    """A results file, refused with a clear message when it is not one this version reads."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MemextError(f"{path}: no such results file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemextError(f"{path}: not a memext results file (not JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MemextError(f"{path}: not a memext suite results file (format != {FORMAT!r})")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MemextError(
            f"{path}: results schema version {version!r}; this memext reads version "
            f"{SCHEMA_VERSION}: re-run `memext eval --suite` to rewrite it"
        )
    if not isinstance(data.get("cells"), list) or not isinstance(data.get("summary"), dict):
        raise MemextError(f"{path}: a results file without its cells or summary (truncated?)")
    return data


def effective_length(
    by_length: dict[int, float], threshold: float, higher_is_better: bool = True
) -> int | None:
    """The longest length whose score, and every shorter length's, holds ``threshold`` of the
    shortest length's score; None when the shortest length's score is not positive (nothing to
    hold). The shortest length itself always qualifies."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} must lie in (0, 1]")
    lengths = sorted(by_length)
    if not lengths:
        return None
    reference = by_length[lengths[0]]
    if not reference > 0:
        return None
    best = None
    for n in lengths:
        score = by_length[n]
        kept = score / reference if higher_is_better else (reference / score if score > 0 else 0)
        if kept < threshold:
            break
        best = n
    return best


def by_length(cells: Iterable[dict[str, Any]], task: str) -> dict[int, float]:
    """A task's score at each length, averaged over depths."""
    sums: dict[int, list[float]] = {}
    for c in cells:
        if c["task"] == task:
            sums.setdefault(int(c["length"]), []).append(float(c["score"]))
    return {n: sum(v) / len(v) for n, v in sorted(sums.items())}


def summarize(cells: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Per task: its metric, score by length and effective context; overall: the shortest
    effective context among the accuracy tasks (``ACCURACY_METRICS``) the model solves at their
    shortest length (``SOLVED``); the mean accuracy by length is kept for the report's plot."""
    tasks: dict[str, Any] = {}
    for task in dict.fromkeys(c["task"] for c in cells):
        first = next(c for c in cells if c["task"] == task)
        scores = by_length(cells, task)
        higher = bool(first["higher_is_better"])
        tasks[task] = {
            "metric": first["metric"],
            "higher_is_better": higher,
            "by_length": {str(n): s for n, s in scores.items()},
            "effective_context": None
            if task == "speed"
            else effective_length(scores, threshold, higher),
        }
    accuracy = [t for t, s in tasks.items() if s["metric"] in ACCURACY_METRICS]
    overall: dict[int, float] = {}
    if accuracy:
        lengths = sorted({int(n) for t in accuracy for n in tasks[t]["by_length"]})
        for n in lengths:
            vals = [tasks[t]["by_length"].get(str(n)) for t in accuracy]
            if all(v is not None for v in vals):
                overall[n] = sum(vals) / len(vals)
    solved = [t for t in accuracy if _first_score(tasks[t]["by_length"]) >= SOLVED]
    reached = [tasks[t]["effective_context"] for t in solved]
    return {
        "threshold": threshold,
        "definition": EFFECTIVE_CONTEXT.format(threshold=threshold, solved=SOLVED),
        "tasks": tasks,
        "accuracy_tasks": accuracy,
        "solved_tasks": solved,
        "mean_accuracy_by_length": {str(n): s for n, s in overall.items()},
        "effective_context": min(reached) if reached else None,
    }


def _first_score(scores: dict[str, float]) -> float:
    """The score at the shortest length (keys are lengths as strings)."""
    return scores[min(scores, key=int)] if scores else 0.0
