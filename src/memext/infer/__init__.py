"""Inference: KV caches and generation."""

# Cache policies in their own modules register themselves on import.
from memext.infer import kivi, retrieval, snapkv  # noqa: F401
