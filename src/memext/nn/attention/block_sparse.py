"""block_sparse attention (being written)."""
