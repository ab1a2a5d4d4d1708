"""From a ``DataConfig`` to a cached token store, reporting skipped files through ``log``; and
the ids of one text read whole (``text_ids``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from memext.config import DataConfig
from memext.data.corpus import read_corpus
from memext.data.store import TokenStore, build_store
from memext.tokenizer import Tokenizer, encode_documents


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


def text_ids(
    text: str, tok: Tokenizer, log: Callable[[str], None] = print, split: str = "validation"
) -> np.ndarray:
    """The ids of ``text``: ``stdlib`` is the built-in corpus's ``split`` ("validation": text
    memext runs do not train on; "train"); a file, directory or glob is read whole, every file in
    path order, each ending with the end-of-document id."""
    if text == "stdlib":
        return np.asarray(prepare_data(DataConfig(corpus="stdlib"), tok, log=log)[0].split(split))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # No held-out share: the text is read whole. With val_percent 0 a corpus of several
        # files keeps them in path order (the last one as its "validation"); one file is cut
        # before its last byte, which is joined back here.
        corpus = read_corpus(text, val_percent=0.0)
    for w in caught:
        log(f"warning: {w.message}")
    docs = [d.data for d in corpus.train + corpus.validation]
    if len(corpus.train) == 1 and corpus.validation[0].name == corpus.train[0].name + "#validation":
        docs = [b"".join(docs)]
    return encode_documents(tok, docs)
