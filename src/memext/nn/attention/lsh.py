"""lsh attention (being written)."""
