"""A random 2-layer BERT and a WordPiece vocabulary, built offline in milliseconds: the encoder
the pipeline tests (chunking, encoder, store, classifier, dialogue, ask) share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

_WORDS = [
    "the",
    "a",
    "man",
    "is",
    "eating",
    "food",
    "piece",
    "of",
    "bread",
    "girl",
    "carrying",
    "baby",
    "riding",
    "horse",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "paris",
    "tower",
    "tomato",
    "pasta",
    "cooking",
    "python",
    "code",
    "memory",
    "long",
    "document",
    "chunk",
    "store",
    "search",
    "passkey",
    "what",
    "was",
    "number",
    "hello",
    "world",
    "and",
    "in",
    "to",
    "it",
]


def tiny_bert_tokenizer() -> Any:
    """A fast WordPiece tokenizer over letters, a few words and some Chinese characters."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-")
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    chinese = list("中文的字是一个好我们你他这那")
    vocab = list(dict.fromkeys(specials + letters + pieces + chinese + _WORDS))
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


def write_tiny_bert(path: Path, seed: int = 0, max_position: int = 64) -> Path:
    """Save a random 2-layer BERT encoder (hidden size 32) and its tokenizer to ``path``."""
    tokenizer = tiny_bert_tokenizer()
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position,
    )
    torch.manual_seed(seed)
    transformers.BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
