"""Text sources, token stores and samplers."""

from memext.data import digest as _digest  # noqa: F401  (registers the summarization tasks)
from memext.data import ruler as _ruler  # noqa: F401  (registers the RULER-style tasks)
from memext.data import seq2seq_tasks as _seq2seq  # noqa: F401  (outline and cipher)
from memext.data.corpus import Corpus, read_corpus
from memext.data.prepare import prepare_data
from memext.data.sampling import sample_batch
from memext.data.store import TokenStore, build_store

__all__ = ["Corpus", "TokenStore", "build_store", "prepare_data", "read_corpus", "sample_batch"]
