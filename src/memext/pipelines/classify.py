"""Long-document classification: chunks -> encoder -> aggregator -> linear head.

A document is split into token-aware chunks that fit the encoder whole, special tokens included
(``chunk_text``); each chunk becomes one embedding (the encoder's mean pooling); an aggregator
(``aggregators.py``: mean, max, attention, transformer) turns a document's chunk embeddings into
one vector, and a linear layer classifies it. The encoder is either frozen (every chunk embedded
once, through the encoder's on-disk cache, and only the head trains) or fine-tuned with the head.
``truncate=True`` is the baseline a plain encoder classifier is: it reads the first chunk only,
i.e. the first ``max_tokens`` tokens, and trains the same way.

A run directory holds ``classifier.json`` (config, label names, the encoder's identity, written
last, so a folder that has it is complete), ``head.safetensors``, ``encoder.safetensors`` (only
when the encoder was fine-tuned) and ``metrics.jsonl`` (one line per epoch).

The classifier is built in five files: ``classify_config.py`` (``ClassifierConfig``),
``classify_model.py`` (the head, ``Classifier``, chunking and embedding documents),
``classify_run.py`` (the run directory: writing it, ``load_classifier``), ``classify_train.py``
(``train_classifier``) and ``classify_eval.py`` (``predict``, ``evaluate``); this module
gathers their public names.
"""

from memext.pipelines.classify_config import ClassifierConfig
from memext.pipelines.classify_eval import evaluate, predict
from memext.pipelines.classify_model import (
    Classifier,
    ClassifierHead,
    build_head,
    pad_chunks,
    pooled_embeddings,
)
from memext.pipelines.classify_run import (
    CLASSIFIER,
    ENCODER_WEIGHTS,
    FORMAT,
    HEAD,
    METRICS,
    load_classifier,
)
from memext.pipelines.classify_train import TrainResult, train_classifier

__all__ = [
    "CLASSIFIER",
    "ENCODER_WEIGHTS",
    "FORMAT",
    "HEAD",
    "METRICS",
    "Classifier",
    "ClassifierConfig",
    "ClassifierHead",
    "TrainResult",
    "build_head",
    "evaluate",
    "load_classifier",
    "pad_chunks",
    "pooled_embeddings",
    "predict",
    "train_classifier",
]
