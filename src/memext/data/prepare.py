"""From a ``DataConfig`` to a cached token store, reporting skipped files through ``log``."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from memext.config import DataConfig
from memext.data.corpus import read_corpus
from memext.data.store import TokenStore, build_store
from memext.tokenizer import Tokenizer


def prepare_data(
    cfg: DataConfig, tok: Tokenizer, log: Callable[[str], None] = print
) -> tuple[TokenStore, tuple[str, ...]]:
    """Read, split and tokenize the corpus (cached); returns the store and the skipped files."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corpus = read_corpus(cfg.corpus, cfg.val_percent, cfg.raw_bytes)
    for w in caught:
        log(f"warning: {w.message}")
    return build_store(corpus, tok), corpus.skipped
