"""Predicting with a classifier and scoring it on labeled documents."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memext.errors import MemextError
from memext.pipelines.classify_model import Classifier, as_texts
from memext.pipelines.classify_run import load_classifier


def _as_classifier(classifier: Classifier | str | Path) -> Classifier:
    if isinstance(classifier, Classifier):
        return classifier
    return load_classifier(classifier, progress=False)


def predict(classifier: Classifier | str | Path, texts: Sequence[str]) -> list[str]:
    """The predicted label of each text, by a ``Classifier`` or the run directory of one."""
    return _as_classifier(classifier).predict(texts)


def evaluate(
    classifier: Classifier | str | Path, texts: Sequence[str], labels: Sequence[str | int]
) -> dict[str, Any]:
    """Score a classifier on labeled documents.

    Returns:
        ``n``, ``accuracy``, ``macro_f1`` (scikit-learn's, over the classes present in the
        labels or predictions), ``labels`` (the classifier's classes), ``confusion`` (rows:
        true label, columns: predicted, in ``labels`` order), ``seconds`` and ``docs_per_s``
        (chunking, embedding and classifying; a frozen encoder's cache can make a repeat fast).

    Raises:
        MemextError: a label the classifier was never trained on (it could never be right).
    """
    clf = _as_classifier(classifier)
    texts = as_texts(texts)
    y = label_ids(clf.labels, labels)
    if len(y) != len(texts):
        raise MemextError(f"{len(texts)} documents but {len(y)} labels")
    start = time.perf_counter()
    pred = clf.logits(clf.embed(texts)).argmax(-1).numpy()
    seconds = time.perf_counter() - start
    return score_predictions(y, pred, clf.labels) | {
        "seconds": round(seconds, 3),
        "docs_per_s": round(len(texts) / seconds, 2) if seconds > 0 else None,
    }


def score_predictions(y: np.ndarray, pred: np.ndarray, names: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    return {
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "labels": list(names),
        "confusion": confusion_matrix(y, pred, labels=list(range(len(names)))).tolist(),
    }


def label_ids(names: list[str], labels: Sequence[str | int]) -> np.ndarray:
    """Class indices of ``labels``; MemextError naming any label outside ``names``."""
    if isinstance(labels, str):
        raise TypeError("expected a list of labels, one per document")
    index = {name: i for i, name in enumerate(names)}
    labels = [str(label) for label in labels]
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise MemextError(
            f"labels {unknown[:5]}{'…' if len(unknown) > 5 else ''} are not among the classes "
            f"this classifier was trained on ({names}), so it can never predict them; evaluate "
            "on data with the training label set, or retrain with these classes"
        )
    return np.asarray([index[label] for label in labels], dtype=np.int64)
