"""sliding attention (being written)."""
